package cachecast.lettuce;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.SocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import io.lettuce.core.ClientOptions;
import io.lettuce.core.RedisChannelHandler;
import io.lettuce.core.RedisClient;
import io.lettuce.core.RedisConnectionStateListener;
import io.lettuce.core.RedisFuture;
import io.lettuce.core.RedisURI;
import io.lettuce.core.api.StatefulRedisConnection;
import io.lettuce.core.protocol.ProtocolVersion;
import io.lettuce.core.pubsub.RedisPubSubListener;
import io.lettuce.core.pubsub.StatefulRedisPubSubConnection;
import io.lettuce.core.resource.ClientResources;
import io.lettuce.core.resource.DefaultClientResources;

/**
 * Behaves like one DHIS 2 instance with Redis cache invalidation on: the client, the two
 * connections and the listener are wired as DHIS 2's
 * org.hisp.dhis.cacheinvalidation.redis.RedisCacheInvalidationConfiguration and
 * RedisCacheInvalidationSubscriptionService do it (shared DefaultClientResources, RedisURI from
 * host/port/password/ssl, no ClientOptions, so Lettuce's defaults: protocol auto-negotiation
 * and auto-reconnect with resubscribe). Driven by line commands on stdin; see the README.
 */
final class Dhis2Instance {
  static final String CHANNEL = "dhis2_cache_invalidation";

  /** How long one message may keep failing before the run reports it. */
  private static final long PUBLISH_BUDGET_MS = 30_000;
  private static final long RETRY_PAUSE_MS = 100;

  private final String uid;
  private final ClientResources resources = DefaultClientResources.create();
  private final RedisClient client;
  /** Last k published with success; messages are numbered 1, 2, 3, ... across commands. */
  private long lastK;

  private volatile StatefulRedisConnection<String, String> conn;
  private volatile StatefulRedisPubSubConnection<String, String> pubSub;
  /** Set when the pub/sub connection drops; the next "subscribed" callback is then a resubscribe. */
  private volatile boolean pubSubLost;
  /** Set on quit, so that closing our own connections is not reported as an outage. */
  private volatile boolean closing;

  Dhis2Instance(Args args) {
    uid = args.require("uid");
    RedisURI.Builder uri = RedisURI.builder().withHost(args.require("host")).withPort(args.port());
    String password = args.get("password");
    if (password != null) {
      uri.withPassword(password.toCharArray());
    }
    String ssl = args.get("ssl");
    if (ssl != null) {
      uri.withSsl(Boolean.parseBoolean(ssl));
    }
    client = RedisClient.create(resources, uri.build());
    // DHIS 2 sets no options; only pin the protocol when a test asks for it.
    ProtocolVersion protocol = args.protocol();
    if (protocol != null) {
      client.setOptions(ClientOptions.builder().protocolVersion(protocol).build());
    }
  }

  int run() throws Exception {
    client.addListener(new ConnectionWatcher());
    conn = client.connect();
    pubSub = client.connectPubSub();

    CountDownLatch subscribed = new CountDownLatch(1);
    pubSub.addListener(new InvalidationListener(subscribed));
    // DHIS 2 subscribes through the async API and does not wait; waiting here only tells
    // the test when messages can be expected.
    RedisFuture<Void> sub = pubSub.async().subscribe(CHANNEL);
    sub.get(30, TimeUnit.SECONDS);
    if (!subscribed.await(30, TimeUnit.SECONDS)) {
      Out.line("FAIL subscribe no subscribed callback within 30 s");
      return 1;
    }
    Out.line("ready");

    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    for (String line; (line = in.readLine()) != null; ) {
      String[] words = line.trim().split("\\s+");
      if (words[0].isEmpty()) {
        continue;
      }
      if (words[0].equals("quit")) {
        break;
      } else if (words[0].equals("publish") && words.length == 2 && words[1].matches("\\d{1,9}")) {
        publish(Integer.parseInt(words[1]));
      } else if (words[0].equals("ping")) {
        ping();
      } else {
        Out.line("FAIL command unknown: " + line.trim());
      }
    }

    closing = true;
    pubSub.close();
    conn.close();
    client.shutdown(0, 2, TimeUnit.SECONDS);
    resources.shutdown(0, 2, TimeUnit.SECONDS).get();
    return 0;
  }

  /**
   * Publishes n messages in order, each awaited. A failing message is retried (every 100 ms,
   * for up to 30 s) rather than skipped, so the published sequence has no gap; a message still
   * failing after that is reported and the counter stays on it for the next command.
   */
  private void publish(int n) throws InterruptedException {
    for (int i = 0; i < n; i++) {
      long k = lastK + 1;
      String message = message(uid, k);
      String error = publishOne(message);
      if (error != null) {
        Out.line("FAIL publish " + k + " " + error);
        return;
      }
      lastK = k;
    }
    Out.line("published " + lastK);
  }

  /**
   * Message k of an instance, in the shapes DHIS 2 publishes, in turn: an entity
   * ({@code <uid>:<op>:<entityClass>:<id>}), a collection of an owner
   * ({@code <uid>:collection:<ownerEntity>:<role>:<ownerId>}) and an entity with a composite id
   * (its parts joined with ';', DataValue's five). k is always the last part.
   */
  static String message(String uid, long k) {
    switch ((int) (k % 3)) {
      case 1:
        return uid + ":update:org.hisp.dhis.dataelement.DataElement:" + k;
      case 2:
        return uid
            + ":collection:org.hisp.dhis.dataset.DataSet:"
            + "org.hisp.dhis.dataset.DataSet.dataSetElements:"
            + k;
      default:
        return uid
            + ":update:org.hisp.dhis.datavalue.DataValue:"
            + "fbfJHSPpUQD;202612;DiszpKrYNg8;HllvX50cXC0;"
            + k;
    }
  }

  /** null on success, else the last error. */
  private String publishOne(String message) throws InterruptedException {
    long deadline = System.currentTimeMillis() + PUBLISH_BUDGET_MS;
    String error = "no attempt";
    while (true) {
      // While disconnected, Lettuce (auto-reconnect on) queues the command and sends it after
      // reconnecting, so the future may stay pending: wait for it up to the whole budget instead
      // of resending, which would duplicate the message.
      RedisFuture<Long> f = conn.async().publish(CHANNEL, message);
      long left = deadline - System.currentTimeMillis();
      try {
        f.get(Math.max(left, 1), TimeUnit.MILLISECONDS);
        return null;
      } catch (TimeoutException e) {
        f.cancel(false); // a cancelled command is not written after a later reconnect
        return "timeout after 30 s (" + error + ")";
      } catch (ExecutionException e) {
        error = Out.describe(e);
        Out.diag("publish failed, retrying: " + error);
      }
      if (System.currentTimeMillis() + RETRY_PAUSE_MS > deadline) {
        return error;
      }
      Thread.sleep(RETRY_PAUSE_MS);
    }
  }

  private void ping() {
    try {
      String reply = conn.sync().ping();
      Out.line("PONG".equals(reply) ? "pong" : "FAIL ping " + reply);
    } catch (RuntimeException e) {
      Out.line("FAIL ping " + Out.describe(e));
    }
  }

  /** DHIS 2's listener type: a plain RedisPubSubListener on the pub/sub connection. */
  private final class InvalidationListener implements RedisPubSubListener<String, String> {
    private final CountDownLatch firstSubscribe;

    InvalidationListener(CountDownLatch firstSubscribe) {
      this.firstSubscribe = firstSubscribe;
    }

    @Override
    public void message(String channel, String message) {
      if (!CHANNEL.equals(channel)) {
        return;
      }
      // DHIS 2 drops its own messages: the first part is the sender's server instance id.
      if (uid.equals(message.split(":", 2)[0])) {
        Out.line("own " + message);
      } else {
        Out.line("recv " + message);
      }
    }

    @Override
    public void message(String pattern, String channel, String message) {}

    @Override
    public void subscribed(String channel, long count) {
      // Lettuce resubscribes by itself after a reconnect; the server's confirmation of that
      // is the moment messages flow again.
      if (pubSubLost) {
        pubSubLost = false;
        Out.line("reconnected");
      }
      firstSubscribe.countDown();
    }

    @Override
    public void psubscribed(String pattern, long count) {}

    @Override
    public void unsubscribed(String channel, long count) {}

    @Override
    public void punsubscribed(String pattern, long count) {}
  }

  /** Notices the pub/sub connection going down, so a later subscribe confirms a reconnect. */
  private final class ConnectionWatcher implements RedisConnectionStateListener {
    @Override
    public void onRedisConnected(RedisChannelHandler<?, ?> connection, SocketAddress address) {
      Out.diag("connected " + name(connection) + " " + address);
    }

    @Override
    public void onRedisDisconnected(RedisChannelHandler<?, ?> connection) {
      Out.diag("disconnected " + name(connection));
      if (connection == pubSub && !pubSubLost && !closing) {
        pubSubLost = true;
        Out.line("disconnected");
      }
    }

    @Override
    public void onRedisExceptionCaught(RedisChannelHandler<?, ?> connection, Throwable cause) {
      Out.diag("exception on " + name(connection) + ": " + Out.describe(cause));
    }

    private String name(RedisChannelHandler<?, ?> connection) {
      return connection == pubSub ? "pubsub" : connection == conn ? "commands" : "connection";
    }
  }
}
