package cachecast.lettuce;

/**
 * Entry point: {@code conformance ...} or {@code dhis2 ...}; see the README next to pom.xml.
 */
public final class Main {
  private Main() {}

  public static void main(String[] argv) throws Exception {
    Out.init();
    if (argv.length == 0) {
      usage();
    }
    Args args;
    try {
      args = new Args(argv, 1);
    } catch (IllegalArgumentException e) {
      Out.diag(e.getMessage());
      usage();
      return;
    }
    // Exit explicitly on every path: Lettuce's netty threads would otherwise keep the JVM
    // alive after an uncaught exception and the test would wait for nothing.
    try {
      switch (argv[0]) {
        case "conformance":
          System.exit(new Conformance(args).run());
          break;
        case "dhis2":
          System.exit(new Dhis2Instance(args).run());
          break;
        default:
          usage();
      }
    } catch (Throwable t) {
      t.printStackTrace();
      Out.line("FAIL " + argv[0] + " " + Out.describe(t));
      System.exit(1);
    }
  }

  private static void usage() {
    Out.diag(
        "usage:\n"
            + "  conformance --host H --port P [--password PW] --protocol RESP2|RESP3\n"
            + "  dhis2 --host H --port P [--password PW] [--ssl true|false] --uid UID"
            + " [--protocol RESP2|RESP3]");
    System.exit(2);
  }
}
