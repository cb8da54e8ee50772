package cachecast.lettuce;

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.logging.Handler;
import java.util.logging.Level;
import java.util.logging.Logger;

/**
 * The one way to write the test protocol to stdout.
 *
 * <p>stdout is the protocol with the Rust test, so it is taken over here and {@code System.out}
 * is pointed at stderr: anything a library prints by accident lands in the diagnostics, never in
 * the protocol. Every line is flushed at once so the test sees it without buffering delays.
 */
final class Out {
  private static final PrintStream PROTOCOL =
      new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);

  private Out() {}

  /** Must run before any Lettuce/netty class is touched. */
  static void init() {
    System.setOut(System.err);
    // netty (and so Lettuce) and reactor fall back to java.util.logging when no slf4j is on
    // the class path, which is the case in this jar. Its console handler writes to stderr;
    // keep it to warnings unless LETTUCE_CLIENT_LOG asks for more (e.g. FINE, ALL).
    Level level = Level.parse(System.getenv().getOrDefault("LETTUCE_CLIENT_LOG", "WARNING"));
    Logger root = Logger.getLogger("");
    root.setLevel(level);
    for (Handler h : root.getHandlers()) {
      h.setLevel(level);
    }
  }

  /** Writes one protocol line; synchronized because Lettuce callbacks run on netty threads. */
  static synchronized void line(String s) {
    PROTOCOL.print(s);
    PROTOCOL.print('\n');
    PROTOCOL.flush();
  }

  /** Diagnostics: stderr, never parsed by the tests. */
  static synchronized void diag(String s) {
    System.err.println(s);
    System.err.flush();
  }

  /** First line of a throwable's message (server errors are one line; Java ones may not be). */
  static String firstLine(Throwable t) {
    String m = t.getMessage();
    if (m == null) {
      return "";
    }
    int nl = m.indexOf('\n');
    return nl < 0 ? m : m.substring(0, nl);
  }

  /** The innermost cause: for a failed handshake that is the server's own error reply. */
  static Throwable rootCause(Throwable t) {
    Throwable r = t;
    while (r.getCause() != null && r.getCause() != r) {
      r = r.getCause();
    }
    return r;
  }

  /** "SimpleClassName: first line of message" of the root cause. */
  static String describe(Throwable t) {
    Throwable r = rootCause(t);
    return r.getClass().getSimpleName() + ": " + firstLine(r);
  }
}
