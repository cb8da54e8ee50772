// ioredis and node-redis against two cachecast sidecars, each on its
// default options: subscribe through one sidecar, publish through the
// other, and check that every message arrives once, in order; then again
// after the subscribers' sidecar has restarted (the clients reconnect and
// resubscribe by themselves). Driven by tests/resp.rs.
//
// Usage: node check.mjs SUB_PORT SUB_PASSWORD|- PUB_PORT PUB_PASSWORD|-
// Prints `ok <client> <phase> <n>` per client and phase, `restart` when
// the first phase is over (then reads one line from stdin once the
// sidecar is back), and `done`; the first failure prints `FAIL ...` and
// exits 1.
import { createInterface } from "node:readline";
import { Redis } from "ioredis";
import { createClient } from "redis";

const [subPort, subPw, pubPort, pubPw] = process.argv.slice(2);
const pw = (p) => (p === "-" ? undefined : p);
const N = 200;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fail(what) {
  console.log(`FAIL ${what}`);
  process.exit(1);
}

// The clients, each a subscriber on the first sidecar and a publisher on
// the second; `got` collects what the subscriber receives.
async function ioredis() {
  const c = { name: "ioredis", channel: "node-ioredis", got: [] };
  // Default options: ioredis sends INFO after connecting (its ready
  // check) and subscribes only once that passes.
  c.sub = new Redis(Number(subPort), "127.0.0.1", { password: pw(subPw) });
  c.pub = new Redis(Number(pubPort), "127.0.0.1", { password: pw(pubPw) });
  for (const x of [c.sub, c.pub]) x.on("error", () => {});
  c.sub.on("message", (ch, m) => ch === c.channel && c.got.push(m));
  await c.sub.subscribe(c.channel);
  c.publish = (m) => c.pub.publish(c.channel, m);
  c.quit = async () => {
    await c.sub.quit();
    await c.pub.quit();
  };
  return c;
}

async function nodeRedis(resp) {
  const c = { name: `node-redis-resp${resp}`, channel: `node-redis-${resp}`, got: [] };
  const opts = (port, password) => ({
    socket: { host: "127.0.0.1", port: Number(port) },
    password: pw(password),
    RESP: resp,
  });
  c.sub = createClient(opts(subPort, subPw));
  c.pub = createClient(opts(pubPort, pubPw));
  for (const x of [c.sub, c.pub]) x.on("error", () => {});
  await c.sub.connect();
  await c.pub.connect();
  await c.sub.subscribe(c.channel, (m, ch) => ch === c.channel && c.got.push(m));
  c.publish = (m) => c.pub.publish(c.channel, m);
  c.quit = async () => {
    await c.sub.close();
    await c.pub.close();
  };
  return c;
}

// Publishes probes until the subscriber hears one (it may be resubscribing
// still), then N numbered messages, awaited one by one; checks that the
// subscriber gets exactly those, in order.
async function delivers(c, phase) {
  const deadline = Date.now() + 30000;
  while (!c.got.includes(`${phase}-probe`)) {
    if (Date.now() > deadline) fail(`${c.name} ${phase}: not subscribed after 30 s`);
    try {
      await c.publish(`${phase}-probe`);
    } catch (e) {
      // The publisher's sidecar is up; the subscriber's may be restarting.
    }
    await sleep(100);
  }
  for (let k = 1; k <= N; k++) await c.publish(`${phase}-${k}`);
  const want = Array.from({ length: N }, (_, i) => `${phase}-${i + 1}`);
  const mine = () => c.got.filter((m) => m.startsWith(`${phase}-`) && !m.endsWith("-probe"));
  while (mine().length < N && Date.now() < deadline + 10000) await sleep(20);
  const got = mine();
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    fail(`${c.name} ${phase}: got ${got.length} of ${N}: ${got.slice(0, 5)}...`);
  }
  console.log(`ok ${c.name} ${phase} ${N}`);
}

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
try {
  const clients = [await ioredis(), await nodeRedis(2), await nodeRedis(3)];
  for (const c of clients) await delivers(c, "before");
  console.log("restart");
  await lines.next();
  for (const c of clients) await delivers(c, "after");
  for (const c of clients) await c.quit();
  console.log("done");
  process.exit(0);
} catch (e) {
  fail(`${e && e.stack ? e.stack.split("\n")[0] : e}`);
}
