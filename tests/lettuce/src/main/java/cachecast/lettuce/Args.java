package cachecast.lettuce;

import java.util.HashMap;
import java.util.Map;

import io.lettuce.core.protocol.ProtocolVersion;

/** "--key value" options after the mode word; nothing fancier is needed by the tests. */
final class Args {
  private final Map<String, String> values = new HashMap<>();

  Args(String[] argv, int from) {
    for (int i = from; i < argv.length; i++) {
      String a = argv[i];
      if (!a.startsWith("--") || i + 1 >= argv.length) {
        throw new IllegalArgumentException("expected --key value, got: " + a);
      }
      values.put(a.substring(2), argv[++i]);
    }
  }

  String get(String key) {
    return values.get(key);
  }

  String require(String key) {
    String v = values.get(key);
    if (v == null) {
      throw new IllegalArgumentException("missing --" + key);
    }
    return v;
  }

  int port() {
    return Integer.parseInt(require("port"));
  }

  /** null when --protocol is absent, so callers can leave Lettuce's default alone. */
  ProtocolVersion protocol() {
    String p = values.get("protocol");
    return p == null ? null : ProtocolVersion.valueOf(p.toUpperCase());
  }
}
