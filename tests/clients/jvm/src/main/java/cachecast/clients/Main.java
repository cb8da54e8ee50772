package cachecast.clients;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.logging.Level;
import java.util.logging.Logger;

import org.redisson.Redisson;
import org.redisson.api.RTopic;
import org.redisson.api.RedissonClient;
import org.redisson.client.codec.StringCodec;
import org.redisson.config.Config;
import org.springframework.boot.actuate.data.redis.RedisHealthIndicator;
import org.springframework.boot.actuate.health.Health;
import org.springframework.core.task.SyncTaskExecutor;
import org.springframework.data.redis.connection.RedisStandaloneConfiguration;
import org.springframework.data.redis.connection.lettuce.LettuceConnectionFactory;
import org.springframework.data.redis.core.StringRedisTemplate;
import org.springframework.data.redis.listener.ChannelTopic;
import org.springframework.data.redis.listener.RedisMessageListenerContainer;

import redis.clients.jedis.DefaultJedisClientConfig;
import redis.clients.jedis.HostAndPort;
import redis.clients.jedis.Jedis;
import redis.clients.jedis.JedisPubSub;
import redis.clients.jedis.RedisProtocol;

/**
 * Jedis (RESP2, RESP3), Redisson and Spring Data Redis's listener container against two cachecast
 * sidecars, each on its default options: subscribe through one sidecar, publish through the
 * other, and check that every message arrives once, in order; then again after the subscribers'
 * sidecar has restarted. Spring Boot's Redis health indicator must report UP with the server's
 * version, before and after. Driven by tests/resp.rs.
 *
 * <p>Usage: java -jar jvm-clients.jar SUB_PORT SUB_PASSWORD|- PUB_PORT PUB_PASSWORD|-
 *
 * <p>Prints {@code ok <client> <phase> <n>} per client and phase, {@code ok spring-health <phase>
 * UP <version>}, {@code restart} when the first phase is over (then reads one line from stdin once
 * the sidecar is back), and {@code done}; the first failure prints {@code FAIL ...} and exits 1.
 */
public final class Main {
  private static final int N = 200;

  private Main() {}

  /** One client: a subscriber on the first sidecar, a publisher on the second. */
  private abstract static class Check {
    final String name;
    final String channel;
    final List<String> got = new CopyOnWriteArrayList<>();

    Check(String name) {
      this.name = name;
      this.channel = "jvm-" + name;
    }

    abstract void publish(String message) throws Exception;

    abstract void close() throws Exception;

    /**
     * Publishes probes until the subscriber hears one (it may be resubscribing still), then N
     * numbered messages, each awaited; checks that the subscriber gets exactly those, in order.
     */
    void delivers(String phase) throws Exception {
      long deadline = System.currentTimeMillis() + 30_000;
      while (!got.contains(phase + "-probe")) {
        if (System.currentTimeMillis() > deadline) {
          fail(name + " " + phase + ": not subscribed after 30 s");
        }
        try {
          publish(phase + "-probe");
        } catch (Exception e) {
          // The publisher's sidecar is up; only a transient error is possible here.
        }
        Thread.sleep(100);
      }
      for (int k = 1; k <= N; k++) {
        publish(phase + "-" + k);
      }
      List<String> want = new ArrayList<>();
      for (int k = 1; k <= N; k++) {
        want.add(phase + "-" + k);
      }
      deadline = System.currentTimeMillis() + 10_000;
      List<String> mine;
      while (true) {
        mine = new ArrayList<>();
        for (String m : got) {
          if (m.startsWith(phase + "-") && !m.endsWith("-probe")) {
            mine.add(m);
          }
        }
        if (mine.size() >= N || System.currentTimeMillis() > deadline) {
          break;
        }
        Thread.sleep(20);
      }
      if (!mine.equals(want)) {
        int i = 0;
        while (i < Math.min(mine.size(), N) && mine.get(i).equals(want.get(i))) {
          i++;
        }
        fail(name + " " + phase + ": got " + mine.size() + " of " + N + ", first difference at "
            + i + ": " + mine.subList(i, Math.min(i + 5, mine.size())));
      }
      line("ok " + name + " " + phase + " " + N);
    }
  }

  static void line(String s) {
    System.out.println(s);
    System.out.flush();
  }

  static void fail(String what) {
    line("FAIL " + what);
    System.exit(1);
  }

  static String pw(String p) {
    return "-".equals(p) ? null : p;
  }

  /** Jedis has no reconnect of its own: the subscriber loop resubscribes, as applications do. */
  private static final class JedisCheck extends Check {
    private final Jedis pub;
    private volatile boolean closing;
    private volatile JedisPubSub current;
    private final Thread thread;

    JedisCheck(RedisProtocol protocol, int subPort, String subPw, int pubPort, String pubPw) {
      super("jedis-" + protocol.name().toLowerCase());
      pub = new Jedis(new HostAndPort("127.0.0.1", pubPort), config(pubPw, protocol));
      HostAndPort sub = new HostAndPort("127.0.0.1", subPort);
      thread =
          new Thread(
              () -> {
                while (!closing) {
                  try (Jedis j = new Jedis(sub, config(subPw, protocol))) {
                    current =
                        new JedisPubSub() {
                          @Override
                          public void onMessage(String ch, String message) {
                            if (channel.equals(ch)) {
                              got.add(message);
                            }
                          }
                        };
                    j.subscribe(current, channel);
                  } catch (RuntimeException e) {
                    try {
                      Thread.sleep(100);
                    } catch (InterruptedException ie) {
                      return;
                    }
                  }
                }
              });
      thread.setDaemon(true);
      thread.start();
    }

    private static DefaultJedisClientConfig config(String password, RedisProtocol protocol) {
      return DefaultJedisClientConfig.builder().password(pw(password)).protocol(protocol).build();
    }

    @Override
    void publish(String message) {
      pub.publish(channel, message);
    }

    @Override
    void close() {
      closing = true;
      if (current != null && current.isSubscribed()) {
        current.unsubscribe();
      }
      pub.close();
    }
  }

  /** Redisson: a topic listener, resubscribed by Redisson after a reconnect. */
  private static final class RedissonCheck extends Check {
    private final RedissonClient sub;
    private final RedissonClient pub;
    private final RTopic pubTopic;

    RedissonCheck(int subPort, String subPw, int pubPort, String pubPw) {
      super("redisson");
      sub = Redisson.create(config(subPort, subPw));
      pub = Redisson.create(config(pubPort, pubPw));
      sub.getTopic(channel, StringCodec.INSTANCE).addListener(String.class, (ch, m) -> got.add(m));
      pubTopic = pub.getTopic(channel, StringCodec.INSTANCE);
    }

    private static Config config(int port, String password) {
      Config c = new Config();
      c.useSingleServer().setAddress("redis://127.0.0.1:" + port).setPassword(pw(password));
      return c;
    }

    @Override
    void publish(String message) {
      pubTopic.publish(message);
    }

    @Override
    void close() {
      sub.shutdown();
      pub.shutdown();
    }
  }

  /** Spring Data Redis: a RedisMessageListenerContainer, on Spring's default (Lettuce). */
  private static final class SpringCheck extends Check {
    final LettuceConnectionFactory subFactory;
    private final LettuceConnectionFactory pubFactory;
    private final RedisMessageListenerContainer container;
    private final StringRedisTemplate template;

    SpringCheck(int subPort, String subPw, int pubPort, String pubPw) {
      super("spring-listener");
      subFactory = factory(subPort, subPw);
      pubFactory = factory(pubPort, pubPw);
      container = new RedisMessageListenerContainer();
      container.setConnectionFactory(subFactory);
      // The container's default executor runs each message on a thread of its own, in no
      // order; a synchronous one hands them on in the order the connection got them.
      container.setTaskExecutor(new SyncTaskExecutor());
      container.addMessageListener(
          (message, pattern) -> got.add(new String(message.getBody(), StandardCharsets.UTF_8)),
          new ChannelTopic(channel));
      container.afterPropertiesSet();
      container.start();
      template = new StringRedisTemplate(pubFactory);
    }

    private static LettuceConnectionFactory factory(int port, String password) {
      RedisStandaloneConfiguration c = new RedisStandaloneConfiguration("127.0.0.1", port);
      if (pw(password) != null) {
        c.setPassword(password);
      }
      LettuceConnectionFactory f = new LettuceConnectionFactory(c);
      f.afterPropertiesSet();
      f.start();
      return f;
    }

    /** What Spring Boot's actuator reports for this Redis (INFO, read for redis_version). */
    void health(String phase) throws InterruptedException {
      RedisHealthIndicator indicator = new RedisHealthIndicator(subFactory);
      long deadline = System.currentTimeMillis() + 30_000;
      Health h = indicator.health();
      while (!"UP".equals(h.getStatus().getCode()) && System.currentTimeMillis() < deadline) {
        Thread.sleep(200);
        h = indicator.health();
      }
      if (!"UP".equals(h.getStatus().getCode())) {
        fail("spring-health " + phase + ": " + h);
      }
      line("ok spring-health " + phase + " UP " + h.getDetails().get("version"));
    }

    @Override
    void publish(String message) {
      template.convertAndSend(channel, message);
    }

    @Override
    void close() throws Exception {
      container.stop();
      container.destroy();
      subFactory.destroy();
      pubFactory.destroy();
    }
  }

  public static void main(String[] argv) {
    Logger.getLogger("").setLevel(Level.SEVERE);
    if (argv.length != 4) {
      fail("usage: SUB_PORT SUB_PASSWORD|- PUB_PORT PUB_PASSWORD|-");
    }
    try {
      int subPort = Integer.parseInt(argv[0]);
      int pubPort = Integer.parseInt(argv[2]);
      String subPw = argv[1];
      String pubPw = argv[3];
      SpringCheck spring = new SpringCheck(subPort, subPw, pubPort, pubPw);
      List<Check> checks =
          List.of(
              new JedisCheck(RedisProtocol.RESP2, subPort, subPw, pubPort, pubPw),
              new JedisCheck(RedisProtocol.RESP3, subPort, subPw, pubPort, pubPw),
              new RedissonCheck(subPort, subPw, pubPort, pubPw),
              spring);
      spring.health("before");
      for (Check c : checks) {
        c.delivers("before");
      }
      line("restart");
      new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8)).readLine();
      for (Check c : checks) {
        c.delivers("after");
      }
      spring.health("after");
      for (Check c : checks) {
        c.close();
      }
      line("done");
      System.exit(0);
    } catch (Throwable t) {
      t.printStackTrace();
      fail(t.toString());
    }
  }
}
