package cachecast.lettuce;

import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

import io.lettuce.core.pubsub.RedisPubSubListener;

/**
 * Records every pub/sub callback as one text line ("message news m1", "subscribed news 1", ...)
 * so the conformance run can check both content and order with plain string comparison.
 */
final class EventQueue implements RedisPubSubListener<String, String> {
  private final BlockingQueue<String> events = new LinkedBlockingQueue<>();

  /** The next callback, or null if none arrives within the timeout. */
  String poll(long timeout, TimeUnit unit) throws InterruptedException {
    return events.poll(timeout, unit);
  }

  @Override
  public void message(String channel, String message) {
    events.add("message " + channel + " " + message);
  }

  @Override
  public void message(String pattern, String channel, String message) {
    events.add("pmessage " + pattern + " " + channel + " " + message);
  }

  @Override
  public void subscribed(String channel, long count) {
    events.add("subscribed " + channel + " " + count);
  }

  @Override
  public void psubscribed(String pattern, long count) {
    events.add("psubscribed " + pattern + " " + count);
  }

  @Override
  public void unsubscribed(String channel, long count) {
    events.add("unsubscribed " + channel + " " + count);
  }

  @Override
  public void punsubscribed(String pattern, long count) {
    events.add("punsubscribed " + pattern + " " + count);
  }
}
