package cachecast.lettuce;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import io.lettuce.core.ClientOptions;
import io.lettuce.core.RedisClient;
import io.lettuce.core.RedisException;
import io.lettuce.core.RedisURI;
import io.lettuce.core.SocketOptions;
import io.lettuce.core.api.StatefulRedisConnection;
import io.lettuce.core.api.sync.RedisCommands;
import io.lettuce.core.protocol.ProtocolVersion;
import io.lettuce.core.pubsub.StatefulRedisPubSubConnection;
import io.lettuce.core.pubsub.api.sync.RedisPubSubCommands;
import io.lettuce.core.resource.ClientResources;
import io.lettuce.core.resource.DefaultClientResources;

/**
 * Runs a fixed list of steps against one server with an explicitly chosen protocol and prints
 * {@code ok <step> <value>} for each; the first mismatch prints {@code FAIL <step> <detail>} and
 * ends the run with exit status 1. Expected values are what a real Redis answers (checked against
 * redis-server 7.0), so a sidecar passes only if Lettuce cannot tell it apart from Redis.
 */
final class Conformance {
  /** Bound for every wait: connect, each command, each pub/sub callback. */
  private static final Duration WAIT = Duration.ofSeconds(5);

  private final String host;
  private final int port;
  private final String password;
  private final ProtocolVersion protocol;
  private final ClientResources resources = DefaultClientResources.create();

  Conformance(Args args) {
    host = args.require("host");
    port = args.port();
    password = args.get("password");
    protocol = args.protocol();
    if (protocol == null) {
      throw new IllegalArgumentException("conformance needs --protocol RESP2|RESP3");
    }
  }

  /** A failed check; {@link #run} turns it into the FAIL line. */
  private static final class StepFailed extends Exception {
    private static final long serialVersionUID = 1L;
    final String step;

    StepFailed(String step, String detail) {
      super(detail);
      this.step = step;
    }
  }

  /** A command or wait that may throw; exceptions become the step's failure. */
  private interface Action<T> {
    T call() throws Exception;
  }

  int run() {
    try {
      steps();
      resources.shutdown(0, 2, TimeUnit.SECONDS).get();
      Out.line("done");
      return 0;
    } catch (StepFailed f) {
      Out.line("FAIL " + f.step + " " + f.getMessage());
      return 1;
    } catch (Exception e) {
      e.printStackTrace();
      Out.line("FAIL unexpected " + Out.describe(e));
      return 1;
    }
  }

  private RedisClient newClient(String pw) {
    RedisURI.Builder uri = RedisURI.builder().withHost(host).withPort(port).withTimeout(WAIT);
    if (pw != null) {
      uri.withPassword(pw.toCharArray());
    }
    RedisClient client = RedisClient.create(resources, uri.build());
    client.setOptions(
        ClientOptions.builder()
            .protocolVersion(protocol)
            .socketOptions(SocketOptions.builder().connectTimeout(WAIT).build())
            .build());
    return client;
  }

  private void steps() throws Exception {
    RedisClient client = newClient(password);
    StatefulRedisConnection<String, String> conn = call("connect", client::connect);
    RedisCommands<String, String> cmd = conn.sync();

    expect("ping", "PONG", call("ping", cmd::ping));
    expect("echo", "hello", call("echo", () -> cmd.echo("hello")));
    expect("client-setname", "OK", call("client-setname", () -> cmd.clientSetname("lettuce-test")));
    expect("client-getname", "lettuce-test", call("client-getname", cmd::clientGetname));

    StatefulRedisPubSubConnection<String, String> psConn = call("connect-pubsub", client::connectPubSub);
    EventQueue events = new EventQueue();
    psConn.addListener(events);
    RedisPubSubCommands<String, String> ps = psConn.sync();

    // Redis counts channels and patterns together in the subscription count.
    call("subscribe", () -> { ps.subscribe("news"); return null; });
    expectEvent(events, "subscribe", "subscribed news 1");
    call("psubscribe", () -> { ps.psubscribe("news.*"); return null; });
    expectEvent(events, "psubscribe", "psubscribed news.* 2");

    expect("publish-news", 1L, call("publish-news", () -> cmd.publish("news", "m1")));
    expect("publish-news.sport", 1L, call("publish-news.sport", () -> cmd.publish("news.sport", "m2")));
    expectEvent(events, "message", "message news m1");
    expectEvent(events, "pmessage", "pmessage news.* news.sport m2");

    List<String> channels = call("pubsub-channels", cmd::pubsubChannels);
    check("pubsub-channels", channels.contains("news"), String.valueOf(channels));
    Out.line("ok pubsub-channels " + channels);
    Map<String, Long> numsub = call("pubsub-numsub", () -> cmd.pubsubNumsub("news"));
    expect("pubsub-numsub", "{news=1}", String.valueOf(numsub));
    expect("pubsub-numpat", 1L, call("pubsub-numpat", cmd::pubsubNumpat));

    // RESP2 answers PING on a subscribed connection as the array ["pong", ""] and Lettuce 6.4
    // returns its second element, so real Redis yields "" there; RESP3 answers +PONG.
    // Quoted so that the empty reply stays visible.
    String wantPing = protocol == ProtocolVersion.RESP2 ? "" : "PONG";
    String gotPing = call("pubsub-ping", ps::ping);
    check("pubsub-ping", wantPing.equals(gotPing),
        "\"" + gotPing + "\" (expected \"" + wantPing + "\")");
    Out.line("ok pubsub-ping \"" + gotPing + "\"");

    call("unsubscribe", () -> { ps.unsubscribe("news"); return null; });
    expectEvent(events, "unsubscribe", "unsubscribed news 1");
    call("punsubscribe", () -> { ps.punsubscribe("news.*"); return null; });
    expectEvent(events, "punsubscribe", "punsubscribed news.* 0");
    expect("publish-after-unsubscribe", 0L, call("publish-after-unsubscribe", () -> cmd.publish("news", "m3")));

    bigRoundTrip(cmd, ps, events, "big-ascii", bigAscii());
    bigRoundTrip(cmd, ps, events, "big-utf8", bigUtf8());

    if (password != null) {
      wrongPassword();
      noPassword();
    }

    psConn.close();
    conn.close();
    client.shutdown(0, 2, TimeUnit.SECONDS);
  }

  /** A 10,000-char message must come back byte for byte (bulk strings are length-framed). */
  private void bigRoundTrip(
      RedisCommands<String, String> cmd,
      RedisPubSubCommands<String, String> ps,
      EventQueue events,
      String step,
      String payload)
      throws Exception {
    call(step, () -> { ps.subscribe("big"); return null; });
    expectEvent(events, step, "subscribed big 1");
    Long receivers = call(step, () -> cmd.publish("big", payload));
    check(step, receivers == 1L, "publish count " + receivers);
    String got = events.poll(WAIT.toMillis(), TimeUnit.MILLISECONDS);
    String want = "message big " + payload;
    check(step, want.equals(got), got == null ? "no message within 5 s" : shorten(got));
    call(step, () -> { ps.unsubscribe("big"); return null; });
    expectEvent(events, step, "unsubscribed big 0");
    Out.line("ok " + step + " " + payload.length() + " chars "
        + payload.getBytes(StandardCharsets.UTF_8).length + " bytes");
  }

  /** Printable ASCII with CRLF every 100 chars: a line-based parser would split it. */
  private static String bigAscii() {
    StringBuilder sb = new StringBuilder(10_000);
    for (int i = 0; sb.length() < 10_000; i++) {
      sb.append(i % 100 == 98 ? "\r\n" : String.valueOf((char) ('!' + i % 94)));
    }
    sb.setLength(10_000);
    return sb.toString();
  }

  /** Multi-byte UTF-8 (2 and 3 bytes per char): byte length differs from char length. */
  private static String bigUtf8() {
    String alphabet = "aé€日 Zø漢\n";
    StringBuilder sb = new StringBuilder(10_000);
    for (int i = 0; i < 10_000; i++) {
      sb.append(alphabet.charAt(i % alphabet.length()));
    }
    return sb.toString();
  }

  /**
   * Lettuce itself sometimes fails a connection whose handshake is refused with
   * "RedisHandshakeHandler not registered": a refused handshake closes the channel, which empties
   * its pipeline, and when that happens before the connect listener looks the handler up, the
   * client reports this instead of the server's answer (the faster the server answers, the more
   * often; a handshake that succeeds leaves the handler in place). That is no answer of the
   * server's, so such a step is tried again.
   */
  private static boolean lettuceRace(String described, String expected, int attempt) {
    return !described.contains(expected)
        && described.contains("RedisHandshakeHandler not registered")
        && attempt < 10;
  }

  private void wrongPassword() throws StepFailed {
    for (int attempt = 1; ; attempt++) {
      RedisClient bad = newClient(password + "-wrong");
      try {
        StatefulRedisConnection<String, String> c = bad.connect();
        String pong = c.sync().ping();
        c.close();
        throw new StepFailed("wrong-password", "connected and PING answered " + pong);
      } catch (RedisException | IllegalStateException e) {
        String d = Out.describe(e);
        if (lettuceRace(d, "WRONGPASS", attempt)) {
          continue;
        }
        Out.line("ok wrong-password " + d);
        return;
      } finally {
        bad.shutdown(0, 2, TimeUnit.SECONDS);
      }
    }
  }

  /** Without a password either the handshake (HELLO) or the first command must say NOAUTH. */
  private void noPassword() throws StepFailed {
    for (int attempt = 1; ; attempt++) {
      RedisClient anon = newClient(null);
      StatefulRedisConnection<String, String> c = null;
      try {
        c = anon.connect();
        String pong = c.sync().ping();
        throw new StepFailed("no-password", "PING answered " + pong);
      } catch (RedisException | IllegalStateException e) {
        String d = Out.describe(e);
        if (lettuceRace(d, "NOAUTH", attempt)) {
          continue;
        }
        check("no-password", d.contains("NOAUTH"), d);
        Out.line("ok no-password " + d);
        return;
      } finally {
        if (c != null) {
          c.close();
        }
        anon.shutdown(0, 2, TimeUnit.SECONDS);
      }
    }
  }

  private static <T> T call(String step, Action<T> action) throws StepFailed {
    try {
      return action.call();
    } catch (Exception e) {
      e.printStackTrace();
      throw new StepFailed(step, Out.describe(e));
    }
  }

  private static void expect(String step, Object want, Object got) throws StepFailed {
    check(step, want.equals(got), String.valueOf(got) + " (expected " + want + ")");
    Out.line("ok " + step + " " + got);
  }

  private static void check(String step, boolean ok, String detail) throws StepFailed {
    if (!ok) {
      throw new StepFailed(step, detail);
    }
  }

  private static void expectEvent(EventQueue events, String step, String want) throws Exception {
    String got = events.poll(WAIT.toMillis(), TimeUnit.MILLISECONDS);
    check(step, want.equals(got), got == null
        ? "no pub/sub callback within 5 s (expected " + want + ")"
        : shorten(got) + " (expected " + want + ")");
    Out.line("ok " + step + " " + got);
  }

  /** Keeps FAIL lines readable when a 10,000-char message is involved; one line always. */
  private static String shorten(String s) {
    String one = s.replace("\r", "\\r").replace("\n", "\\n");
    return one.length() <= 120 ? one : one.substring(0, 120) + "...(" + s.length() + " chars)";
  }
}
