// Independent cachecast peer (protocol version 2), written from proto/PROTOCOL.md alone.
//
// Run:       java tests/interop/Peer.java --id 127.0.0.1:23002 --node 127.0.0.1:23001 [--send N] [--secret S] [--batch B] [--buffer C]
// Self-test: java tests/interop/Peer.java --selftest --vectors proto/vectors
//
// stdout carries only the machine-readable lines of the interop contract (each flushed at once);
// everything else goes to stderr. Single source file, JDK only, Java 11+.

import java.io.BufferedInputStream;
import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

public class Peer {
    // ------------------------------------------------------------------ constants (sections 3, 5, 6, 10)
    static final int MAX_FRAME = 1_048_576;
    static final int VERSION = 2; // the only version spoken (7.5)
    static final int T_HELLO = 0, T_AUTH = 1, T_BATCH = 2, T_ACK = 3, T_PING = 4, T_PONG = 5, T_GOODBYE = 6, T_REJECT = 7, T_RESUME = 8;
    static final String[] NAMES = {"Hello", "Auth", "Batch", "Ack", "Ping", "Pong", "Goodbye", "Reject", "Resume"};
    static final int I_KEY = 0, I_CACHE = 1, I_FLUSH = 2;
    static final byte[] MAGIC = {0x43, 0x43, 0x53, 0x54};
    static final int MAX_NODE = 512, MAX_NAME = 65_536, MAX_REASON = 65_536;
    static final int TAG = 16, DIGEST = 16; // frame tag (7.6), fingerprint (9.5)
    static final byte[] ZERO_DIGEST = new byte[DIGEST];
    static final long HANDSHAKE_MS = 5000, SILENCE_MS = 3000, PING_IDLE_MS = 1000, CONNECT_MS = 2000, GOODBYE_MS = 2000;

    // ------------------------------------------------------------------ messages
    static final class ProtoError extends Exception {
        ProtoError(String m) { super(m); }
    }

    static final class Timeout extends IOException {
        Timeout() { super("deadline passed"); }
    }

    static final class Eof extends IOException {
        Eof(String m) { super(m); }
    }

    static final class Item {
        int kind;
        String cache, key;

        static Item key(String c, String k) { Item i = new Item(); i.kind = I_KEY; i.cache = c; i.key = k; return i; }
        static Item cache(String c) { Item i = new Item(); i.kind = I_CACHE; i.cache = c; return i; }
        static Item flush() { Item i = new Item(); i.kind = I_FLUSH; return i; }
    }

    static final class Msg {
        int type;
        // Hello
        byte[] magic = MAGIC;
        int version = VERSION;
        String node;
        long inc;
        byte[] nonce;
        boolean hasLast; // Hello.last_applied, Resume.last_applied
        long lastInc, lastSeq;
        boolean auth;
        // Resume (with hasLast, lastInc, lastSeq above)
        byte[] digest;
        // Auth
        byte[] mac;
        // Batch
        long firstSeq;
        List<Item> items;
        // Ack
        long ackInc, ackSeq;
        // Goodbye
        long goodbyeSeq;
        // Reject
        String reason;

        static Msg of(int t) { Msg m = new Msg(); m.type = t; return m; }
    }

    static String name(int t) { return t >= 0 && t < NAMES.length ? NAMES[t] : "message " + t; }

    static String u(long v) { return Long.toUnsignedString(v); }

    // ------------------------------------------------------------------ decoding (section 4)
    static final class Dec {
        final byte[] b;
        int p;

        Dec(byte[] b) { this.b = b; }

        int remaining() { return b.length - p; }

        void need(int n, String what) throws ProtoError {
            if (remaining() < n) throw new ProtoError("truncated payload (reading " + what + ")");
        }

        int u8(String what) throws ProtoError { need(1, what); return b[p++] & 0xff; }

        long le(int n, String what) throws ProtoError {
            need(n, what);
            long v = 0;
            for (int i = 0; i < n; i++) v |= (long) (b[p + i] & 0xff) << (8 * i);
            p += n;
            return v;
        }

        /** maxMarker: 0xfb for u16, 0xfc for u32 (enum indexes), 0xfd for u64 / lengths / counts. */
        long varint(int maxMarker, String what) throws ProtoError {
            int m = u8(what);
            if (m <= 250) return m;
            if (m == 0xfe || m == 0xff) throw new ProtoError(String.format("invalid varint marker 0x%02x in %s", m, what));
            if (m > maxMarker) throw new ProtoError(String.format("varint marker 0x%02x too wide for %s", m, what));
            if (m == 0xfb) return le(2, what);
            if (m == 0xfc) return le(4, what);
            return le(8, what);
        }

        boolean bool(String what) throws ProtoError {
            int v = u8(what);
            if (v > 1) throw new ProtoError(String.format("invalid bool byte 0x%02x in %s", v, what));
            return v == 1;
        }

        byte[] fixed(int n, String what) throws ProtoError {
            need(n, what);
            byte[] r = Arrays.copyOfRange(b, p, p + n);
            p += n;
            return r;
        }

        String str(String what, long min, long max) throws ProtoError {
            long len = varint(0xfd, what + " length");
            if (Long.compareUnsigned(len, max) > 0) throw new ProtoError(what + " too long: " + u(len) + " bytes (limit " + max + ")");
            if (len < min) throw new ProtoError(what + " is empty");
            need((int) len, what);
            String s;
            try {
                s = StandardCharsets.UTF_8.newDecoder()
                        .onMalformedInput(CodingErrorAction.REPORT)
                        .onUnmappableCharacter(CodingErrorAction.REPORT)
                        .decode(ByteBuffer.wrap(b, p, (int) len)).toString();
            } catch (CharacterCodingException e) {
                throw new ProtoError("invalid UTF-8 in " + what);
            }
            p += (int) len;
            return s;
        }
    }

    static Msg decode(byte[] payload) throws ProtoError {
        if (payload.length == 0) throw new ProtoError("empty payload");
        Dec d = new Dec(payload);
        long idx = d.varint(0xfc, "message index");
        if (idx > T_RESUME) throw new ProtoError("unknown message index " + u(idx));
        Msg m = Msg.of((int) idx);
        switch (m.type) {
            case T_HELLO:
                m.magic = d.fixed(4, "magic");
                m.version = (int) d.varint(0xfb, "version");
                m.node = d.str("Hello.node", 0, MAX_NODE);
                m.inc = d.varint(0xfd, "incarnation");
                m.nonce = d.fixed(32, "nonce");
                m.hasLast = optionTag(d, "last_applied");
                if (m.hasLast) {
                    m.lastInc = d.varint(0xfd, "last_applied.incarnation");
                    m.lastSeq = d.varint(0xfd, "last_applied.seq");
                }
                m.auth = d.bool("auth");
                break;
            case T_AUTH:
                m.mac = d.fixed(32, "mac");
                break;
            case T_BATCH: {
                m.firstSeq = d.varint(0xfd, "first_seq");
                if (m.firstSeq == 0) throw new ProtoError("Batch first_seq 0");
                long count = d.varint(0xfd, "item count");
                if (count != 0 && Long.compareUnsigned(count - 1, ~m.firstSeq) > 0)
                    throw new ProtoError("Batch seqs overflow u64 (first_seq " + u(m.firstSeq) + ", " + u(count) + " items)");
                if (Long.compareUnsigned(count, d.remaining()) > 0)
                    throw new ProtoError("truncated payload (Batch claims " + u(count) + " items, " + d.remaining() + " bytes left)");
                m.items = new ArrayList<>((int) count);
                for (long i = 0; i < count; i++) {
                    long k = d.varint(0xfc, "item index");
                    if (k == I_KEY) m.items.add(Item.key(d.str("cache name", 1, MAX_NAME), d.str("key", 0, MAX_NAME)));
                    else if (k == I_CACHE) m.items.add(Item.cache(d.str("cache name", 1, MAX_NAME)));
                    else if (k == I_FLUSH) m.items.add(Item.flush());
                    else throw new ProtoError("unknown item index " + u(k));
                }
                break;
            }
            case T_ACK:
                m.ackInc = d.varint(0xfd, "Ack.incarnation");
                m.ackSeq = d.varint(0xfd, "Ack.seq");
                break;
            case T_PING:
            case T_PONG:
                break;
            case T_GOODBYE:
                m.goodbyeSeq = d.varint(0xfd, "Goodbye.last_seq");
                break;
            case T_REJECT:
                m.reason = d.str("Reject.reason", 0, MAX_REASON);
                break;
            case T_RESUME:
                m.hasLast = optionTag(d, "Resume.last_applied");
                if (m.hasLast) {
                    m.lastInc = d.varint(0xfd, "Resume.last_applied.incarnation");
                    m.lastSeq = d.varint(0xfd, "Resume.last_applied.seq");
                }
                m.digest = d.fixed(DIGEST, "Resume.digest");
                break;
            default:
                throw new ProtoError("unknown message index " + idx);
        }
        if (d.remaining() != 0) throw new ProtoError(d.remaining() + " trailing bytes after " + name(m.type));
        return m;
    }

    static boolean optionTag(Dec d, String what) throws ProtoError {
        int v = d.u8(what);
        if (v > 1) throw new ProtoError(String.format("invalid Option byte 0x%02x in %s", v, what));
        return v == 1;
    }

    // ------------------------------------------------------------------ encoding
    static final class Enc {
        final ByteArrayOutputStream o = new ByteArrayOutputStream();

        void u8(int v) { o.write(v); }

        void raw(byte[] b) { o.write(b, 0, b.length); }

        void le(long v, int n) { for (int i = 0; i < n; i++) o.write((int) (v >>> (8 * i)) & 0xff); }

        void varint(long v) {
            if (Long.compareUnsigned(v, 250) <= 0) u8((int) v);
            else if (Long.compareUnsigned(v, 0xFFFFL) <= 0) { u8(0xfb); le(v, 2); }
            else if (Long.compareUnsigned(v, 0xFFFFFFFFL) <= 0) { u8(0xfc); le(v, 4); }
            else { u8(0xfd); le(v, 8); }
        }

        void str(String s, int min, int max, String what) {
            byte[] b = utf8(s);
            if (b.length < min || b.length > max) throw new IllegalArgumentException(what + " length " + b.length + " outside " + min + ".." + max);
            varint(b.length);
            raw(b);
        }
    }

    static byte[] utf8(String s) {
        try {
            ByteBuffer bb = StandardCharsets.UTF_8.newEncoder()
                    .onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .encode(java.nio.CharBuffer.wrap(s));
            byte[] r = new byte[bb.remaining()];
            bb.get(r);
            return r;
        } catch (CharacterCodingException e) {
            throw new IllegalArgumentException("string with an unpaired surrogate cannot be sent");
        }
    }

    static byte[] encode(Msg m) {
        Enc e = new Enc();
        e.varint(m.type);
        switch (m.type) {
            case T_HELLO:
                e.raw(m.magic);
                e.varint(m.version);
                e.str(m.node, 0, MAX_NODE, "Hello.node");
                e.varint(m.inc);
                e.raw(m.nonce);
                if (m.hasLast) { e.u8(1); e.varint(m.lastInc); e.varint(m.lastSeq); } else e.u8(0);
                e.u8(m.auth ? 1 : 0);
                break;
            case T_AUTH:
                e.raw(m.mac);
                break;
            case T_BATCH:
                if (m.firstSeq == 0 || m.items.isEmpty()) throw new IllegalArgumentException("bad Batch");
                e.varint(m.firstSeq);
                e.varint(m.items.size());
                for (Item it : m.items) encodeItem(e, it);
                break;
            case T_ACK:
                e.varint(m.ackInc);
                e.varint(m.ackSeq);
                break;
            case T_PING:
            case T_PONG:
                break;
            case T_GOODBYE:
                e.varint(m.goodbyeSeq);
                break;
            case T_REJECT:
                e.str(m.reason, 0, MAX_REASON, "Reject.reason");
                break;
            case T_RESUME:
                if (m.digest.length != DIGEST) throw new IllegalArgumentException("digest of " + m.digest.length + " bytes");
                if (m.hasLast) { e.u8(1); e.varint(m.lastInc); e.varint(m.lastSeq); } else e.u8(0);
                e.raw(m.digest);
                break;
            default:
                throw new IllegalArgumentException("type " + m.type);
        }
        return e.o.toByteArray();
    }

    static void encodeItem(Enc e, Item it) {
        e.varint(it.kind);
        if (it.kind == I_KEY) { e.str(it.cache, 1, MAX_NAME, "cache"); e.str(it.key, 0, MAX_NAME, "key"); }
        else if (it.kind == I_CACHE) e.str(it.cache, 1, MAX_NAME, "cache");
    }

    static byte[] frame(Msg m) {
        return frameOf(encode(m), null);
    }

    /** Length prefix, payload, then the tag if any (section 3: n counts both). */
    static byte[] frameOf(byte[] p, byte[] tag) {
        int t = tag == null ? 0 : tag.length;
        if (p.length + t > MAX_FRAME) throw new IllegalArgumentException("frame too large");
        byte[] f = new byte[4 + p.length + t];
        ByteBuffer.wrap(f).putInt(p.length + t);
        System.arraycopy(p, 0, f, 4, p.length);
        if (tag != null) System.arraycopy(tag, 0, f, 4 + p.length, t);
        return f;
    }

    static byte[] concat(byte[]... parts) {
        ByteArrayOutputStream o = new ByteArrayOutputStream();
        for (byte[] p : parts) o.write(p, 0, p.length);
        return o.toByteArray();
    }

    // ------------------------------------------------------------------ authentication (7.4)
    static byte[] authMessage(byte role, Msg dialerHello, Msg acceptorHello) {
        ByteArrayOutputStream o = new ByteArrayOutputStream();
        byte[] label = "cachecast auth v1".getBytes(StandardCharsets.US_ASCII);
        o.write(label, 0, label.length);
        o.write(0);
        o.write(role);
        for (Msg h : new Msg[]{dialerHello, acceptorHello}) {
            byte[] node = utf8(h.node);
            ByteBuffer bb = ByteBuffer.allocate(4 + node.length + 32 + 8 + 2 + 1 + 17); // big-endian
            bb.putInt(node.length).put(node).put(h.nonce).putLong(h.inc).putShort((short) h.version).put((byte) (h.auth ? 1 : 0));
            if (h.hasLast) bb.put((byte) 1).putLong(h.lastInc).putLong(h.lastSeq);
            else bb.put((byte) 0);
            o.write(bb.array(), 0, bb.position());
        }
        return o.toByteArray();
    }

    static byte[] hmac(byte[] key, byte[] msg) {
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(key, "HmacSHA256"));
            return mac.doFinal(msg);
        } catch (Exception e) {
            throw new IllegalStateException(e);
        }
    }

    // ------------------------------------------------------------------ frame tags (7.6) and fingerprints (9.5)
    /** K = HMAC(secret, "cachecast session v2\0" || dialer nonce || acceptor nonce). */
    static byte[] sessionKey(byte[] secret, byte[] dialerNonce, byte[] acceptorNonce) {
        byte[] label = "cachecast session v2".getBytes(StandardCharsets.US_ASCII);
        return hmac(secret, concat(label, new byte[]{0}, dialerNonce, acceptorNonce));
    }

    /** One direction's tags on one connection: its own Mac (not thread-safe) and its counter. */
    static final class Tagger {
        final Mac mac;
        final byte role;
        long counter; // tagged frames of this direction so far: the next one's counter

        Tagger(byte[] key, byte role) {
            try {
                mac = Mac.getInstance("HmacSHA256");
                mac.init(new SecretKeySpec(key, "HmacSHA256"));
            } catch (Exception e) {
                throw new IllegalStateException(e);
            }
            this.role = role;
        }

        /** First 16 bytes of HMAC(K, role || counter (u64 big-endian) || payload); the counter moves on. */
        byte[] next(byte[] payload, int len) {
            mac.update(role);
            mac.update(ByteBuffer.allocate(8).putLong(counter++).array());
            mac.update(payload, 0, len);
            return Arrays.copyOf(mac.doFinal(), TAG);
        }
    }

    /** 7.6: the message of a tagged payload, once its tag is checked (constant time) against rx's next counter. */
    static byte[] unseal(Tagger rx, byte[] p) throws ProtoError {
        if (p.length <= TAG) throw new ProtoError("frame authentication failed: a frame of " + p.length + " bytes cannot hold a message and a tag");
        int n = p.length - TAG;
        long ctr = rx.counter;
        byte[] want = rx.next(p, n);
        if (!MessageDigest.isEqual(want, Arrays.copyOfRange(p, n, p.length)))
            throw new ProtoError("frame authentication failed (wrong tag on the frame with counter " + u(ctr) + ")");
        return Arrays.copyOf(p, n);
    }

    /** 9.5: SHA-256("cachecast item v2\0" || incarnation BE || seq BE || canonical item encoding), first 16 bytes. */
    static byte[] fingerprint(long inc, long seq, Item it) {
        Enc e = new Enc();
        byte[] label = "cachecast item v2".getBytes(StandardCharsets.US_ASCII);
        e.raw(label);
        e.u8(0);
        e.raw(ByteBuffer.allocate(16).putLong(inc).putLong(seq).array());
        encodeItem(e, it); // re-encoded: shortest forms, whatever form the item arrived in
        try {
            return Arrays.copyOf(MessageDigest.getInstance("SHA-256").digest(e.o.toByteArray()), DIGEST);
        } catch (Exception x) {
            throw new IllegalStateException(x);
        }
    }

    // ------------------------------------------------------------------ output
    static PrintStream OUT;

    static void out(String line) {
        synchronized (Peer.class) {
            OUT.print(line + "\n");
            OUT.flush();
        }
    }

    static boolean quietFindings; // the selftest provokes findings on purpose: stderr only

    static void error(String desc) {
        if (quietFindings) { log("selftest, expected finding: " + desc); return; }
        out("error " + desc.replace('\n', ' ').replace('\r', ' '));
        log("ERROR " + desc);
    }

    static void log(String s) {
        synchronized (System.err) {
            System.err.println("[peer " + System.currentTimeMillis() % 100000 + "] " + s);
        }
    }

    static String printable(String s) {
        return s.replace("\n", "\\n").replace("\r", "\\r");
    }

    // ------------------------------------------------------------------ configuration
    static String ID, NODE, NODE_HOST;
    static int ID_PORT, NODE_PORT;
    static byte[] SECRET; // null: no shared secret
    static int BATCH = 100;
    static int CAPACITY = 65_536; // replay buffer bound (9.2), as the reference's cachecast.buffer default
    static final SecureRandom RNG = new SecureRandom();

    // ------------------------------------------------------------------ origin state (we as dialer / origin), guarded by L
    static final Object L = new Object();
    static long myInc;
    static long lastAssigned; // highest seq assigned
    static Item[] ring; // replay buffer (9.2): seq s at ring[s mod CAPACITY] for front <= s <= lastAssigned
    static long front = 1; // seq of the oldest entry held; lastAssigned + 1 when none is
    static long acked; // cursor of the node
    static Long ackedRun; // the node's incarnation (its run) whose Acks or Resume last set acked (9.4); null: none yet
    static long divergences; // counted, as the reference does (9.4)
    static long flushedAt; // seq of the last synthetic Flush written to the node (9.3), 0: none; a position there is ours (9.4)
    static final ArrayDeque<Long> targets = new ArrayDeque<>();
    static boolean everUp;
    static OutConn outbound; // handshake complete
    static OutConn dialing; // in handshake
    static boolean shuttingDown;
    static long goodbyeDeadline;

    // ------------------------------------------------------------------ receiver state (the node as origin), guarded by R
    static final Object R = new Object();
    static boolean rKnown, rFresh;
    static long rInc, rA;
    static byte[] rD = ZERO_DIGEST; // fingerprint of the item applied at rA; zero when rA was set otherwise (9.5)
    static Long rGoodbye;
    static final ArrayDeque<Long> rOld = new ArrayDeque<>(); // replaced incarnations (last 8)
    // What we held for the incarnation the current one replaced (rPrevD null: none since we started). Our Resume
    // reports it while nothing of the current one arrived, so the node's new run learns we saw its previous one and
    // sends us no opening Flush for it, whichever connection told us of the new run first (7.2 step 1, 9.9).
    static long rPrevInc, rPrevA;
    static byte[] rPrevD;
    static InConn currentIn;
    static final List<InConn> allIn = new ArrayList<>();
    // 9.7: connections (either direction) on which a Hello of the node was accepted, until their reader is done with
    // them: while one of the current incarnation is here, another incarnation waits, so that a restarted node's new
    // run gets in only after its previous run's Goodbye, still unread on an older connection, was taken.
    static final List<Conn> upConns = new ArrayList<>();
    // Another incarnation held back (9.7), since when, and when a duplicate identity was last reported as an error.
    static boolean held;
    static long heldInc, heldSince, dupReportedAt;
    // A previous run's connections are gone within this (noticed dead, then a retry at the backoff cap, section 10):
    // a new run held back longer is a second node under the node's identity.
    static final long RESTART_WINDOW_MS = SILENCE_MS + PING_IDLE_MS + 5000;
    static ServerSocket server;

    static abstract class Conn {
        final Socket s;
        final InputStream in;
        final OutputStream os;
        volatile boolean closed;
        long upInc; // the node's incarnation its Hello gave, while in upConns (guarded by R)
        // 7.6, with a secret: set once this side has written its Auth (tx) / verified the other's (rx)
        Tagger tx; // used under the os lock only
        Tagger rx; // used by the one reading thread only

        Conn(Socket s) throws IOException {
            this.s = s;
            s.setTcpNoDelay(true);
            in = new BufferedInputStream(s.getInputStream(), 65536);
            os = s.getOutputStream();
        }

        void write(byte[] b) throws IOException {
            synchronized (os) {
                os.write(b);
                os.flush();
            }
        }

        /** Untagged frames (or null), then the payloads as frames, tagged once tx is set: tags are made under the
         *  lock, so counters follow the order on the wire; one write. */
        void writeFrames(byte[] plain, List<byte[]> payloads) throws IOException {
            synchronized (os) {
                ByteArrayOutputStream o = new ByteArrayOutputStream();
                if (plain != null) o.write(plain, 0, plain.length);
                for (byte[] p : payloads) {
                    byte[] f = frameOf(p, tx == null ? null : tx.next(p, p.length));
                    o.write(f, 0, f.length);
                }
                os.write(o.toByteArray());
                os.flush();
            }
        }

        void close() {
            closed = true;
            try { s.close(); } catch (IOException ignored) { }
        }

        byte[] readFrame(long deadline) throws IOException, ProtoError {
            byte[] hdr = new byte[4];
            readFully(hdr, deadline, true);
            long n = ByteBuffer.wrap(hdr).getInt() & 0xFFFFFFFFL;
            if (n > MAX_FRAME) throw new ProtoError("frame length " + n + " exceeds 1 MiB");
            if (n == 0) throw new ProtoError("empty payload (frame length 0)");
            byte[] p = new byte[(int) n];
            readFully(p, deadline, false);
            return p;
        }

        Msg readMsg(long deadline) throws IOException, ProtoError {
            byte[] p = readFrame(deadline);
            return decode(rx == null ? p : unseal(p));
        }

        /** 7.6: the tag is checked (constant time) before the message is decoded; the message without it. */
        byte[] unseal(byte[] p) throws ProtoError {
            return Peer.unseal(rx, p);
        }

        /** Where the other side's Resume is due: a Reject may come instead, never tagged (7.3, 7.6). */
        Msg readResumeOrReject(long deadline) throws IOException, ProtoError {
            byte[] p = readFrame(deadline);
            if (rx == null) return decode(p);
            try {
                return decode(unseal(p));
            } catch (ProtoError tagError) {
                Msg m;
                try {
                    m = decode(p);
                } catch (ProtoError e) {
                    throw tagError;
                }
                if (m.type != T_REJECT) throw tagError;
                return m;
            }
        }

        private void readFully(byte[] b, long deadline, boolean boundary) throws IOException {
            int off = 0;
            while (off < b.length) {
                long rem = deadline - System.currentTimeMillis();
                if (rem <= 0) throw new Timeout();
                s.setSoTimeout((int) Math.max(1, Math.min(rem, Integer.MAX_VALUE)));
                int r;
                try {
                    r = in.read(b, off, b.length - off);
                } catch (SocketTimeoutException e) {
                    throw new Timeout();
                }
                if (r < 0) throw new Eof(boundary && off == 0 ? "end of stream" : "end of stream inside a frame");
                off += r;
            }
        }

        /** Best-effort Reject (7.2/7.3), then close the sending side and the connection. */
        void reject(String reason) {
            if (utf8(reason).length > MAX_REASON) reason = "refused";
            Msg r = Msg.of(T_REJECT);
            r.reason = reason;
            try {
                s.setSoTimeout(1000);
                write(frame(r));
                s.shutdownOutput();
                // drain briefly so that closing does not reset the connection before the peer reads the Reject
                long end = System.currentTimeMillis() + 500;
                byte[] sink = new byte[4096];
                while (System.currentTimeMillis() < end) {
                    s.setSoTimeout((int) Math.max(1, end - System.currentTimeMillis()));
                    if (in.read(sink) < 0) break;
                }
            } catch (IOException ignored) {
            }
            close();
        }
    }

    static final class OutConn extends Conn {
        long peerInc; // the node's incarnation in its Hello: the receiver run its Acks come from (9.4)
        long sent;
        boolean goodbyeQueued; // taken for writing: nothing may follow it
        boolean goodbyeSent;   // written to the socket: shutdown may close
        Thread reader;         // outboundReader, once started (the dialer thread's only)

        OutConn(Socket s) throws IOException { super(s); }
    }

    static final class InConn extends Conn {
        long helloInc;
        long f; // 9.5: at first the seq our Resume announced (0 if of another incarnation), then the last seq received
        long[] ackPos; // position to acknowledge (guarded by this)
        long[] lastAckWritten;
        boolean pongOwed;

        InConn(Socket s) throws IOException { super(s); }

        @Override
        void close() {
            super.close();
            synchronized (this) { notifyAll(); }
        }
    }

    static Msg myHello() {
        Msg h = Msg.of(T_HELLO);
        h.version = VERSION;
        h.node = ID;
        h.inc = myInc;
        h.nonce = new byte[32];
        RNG.nextBytes(h.nonce);
        h.hasLast = false; // 5.2: positions travel in Resume, once the other side has proven itself
        h.auth = SECRET != null;
        return h;
    }

    /** 7.2 step 1 / 7.3: the position held for the node as an origin, and the fingerprint that goes with it. */
    static Msg myResume() {
        Msg r = Msg.of(T_RESUME);
        synchronized (R) {
            r.hasLast = rKnown;
            if (rKnown && rFresh && rA == 0 && rPrevD != null) {
                // nothing of the current incarnation yet: what we held for the one it replaced (7.2 step 1)
                r.lastInc = rPrevInc; r.lastSeq = rPrevA;
                r.digest = rPrevD.clone();
            } else {
                if (rKnown) { r.lastInc = rInc; r.lastSeq = rA; }
                r.digest = rKnown ? rD.clone() : ZERO_DIGEST.clone();
            }
        }
        return r;
    }

    static String pos(Msg m) {
        return m.hasLast ? u(m.lastInc) + "/" + u(m.lastSeq) : "none";
    }

    /** 5.6: no position, or seq 0, goes with 16 zero bytes. A finding, not a reason to close. */
    static void checkResumeDigest(Msg r, String whose) {
        if ((!r.hasLast || r.lastSeq == 0) && !Arrays.equals(r.digest, ZERO_DIGEST))
            error(whose + " Resume announces " + pos(r) + " with digest " + toHex(r.digest) + ", not 16 zero bytes (5.6)");
    }

    static boolean asciiEqualsIgnoreCase(String a, String b) {
        if (a.length() != b.length()) return false;
        for (int i = 0; i < a.length(); i++) {
            char x = a.charAt(i), y = b.charAt(i);
            if (x >= 'A' && x <= 'Z') x += 32;
            if (y >= 'A' && y <= 'Z') y += 32;
            if (x != y) return false;
        }
        return true;
    }

    /** Checks shared by 7.2 (acceptor) and 7.3 (dialer); returns the reason or null. */
    static String checkHello(Msg h, boolean asAcceptor) {
        if (!Arrays.equals(h.magic, MAGIC)) return "bad magic: not a cachecast peer";
        // 7.5: version 1 cannot carry version 2's guarantees, so there is no stepping down to it
        if (h.version < VERSION) return "unsupported protocol version " + h.version + " (this node speaks " + VERSION + ")";
        if (!asciiEqualsIgnoreCase(h.node, NODE))
            return asAcceptor ? "\"" + h.node + "\" is not a configured peer of " + ID
                    : "the node answered as \"" + h.node + "\", not as " + NODE + ", the peer dialed";
        if (h.auth && SECRET == null) return "the peer has a shared secret (cachecast.secret) and this node has none";
        if (!h.auth && SECRET != null) return "this node requires a shared secret (cachecast.secret) and the peer has none";
        return null;
    }

    /**
     * 9.7, for a Hello of the node on c (null in the selftest): null when accepted, c then counting as up with inc
     * until released by down(c); or the reason of a duplicate identity, nothing changed (the caller refuses).
     */
    static String applyIncarnation(Conn c, long inc, String via) {
        synchronized (R) {
            if (rKnown && rInc != inc) {
                for (Conn x : upConns) if (x.upInc == rInc) return duplicate(inc, via);
            }
            held = false;
            if (c != null) {
                c.upInc = inc;
                upConns.add(c);
            }
            if (rKnown && rInc == inc) return null;
            // A replaced incarnation back (only a second node can do that): its position here was given up, so no
            // Goodbye excuses it.
            boolean returning = rOld.remove(inc);
            if (rKnown) {
                boolean clean = !returning && rGoodbye != null && Long.compareUnsigned(rA, rGoodbye) >= 0;
                log("node " + NODE + " new incarnation " + u(inc) + " (was " + u(rInc) + ", a=" + u(rA) + ", goodbye="
                        + (rGoodbye == null ? "none" : u(rGoodbye)) + ") via " + via + (clean ? ": clean restart" : ": flush"));
                if (!clean) out("flush-local new-incarnation");
                // the record of the incarnation being replaced itself, not what it reported while fresh: the new
                // run follows that one (9.9)
                rPrevInc = rInc; rPrevA = rA; rPrevD = rD;
                rOld.addLast(rInc);
                while (rOld.size() > 8) rOld.removeFirst();
            }
            rKnown = true;
            rInc = inc;
            rA = 0;
            rD = ZERO_DIGEST;
            rFresh = true;
            rGoodbye = null;
            return null;
        }
    }

    /** Under R. 9.7: inc refused while the current incarnation has a connection up; the reason, logged. */
    static String duplicate(long inc, String via) {
        String why = "two running nodes answer as " + NODE + ": incarnation " + u(inc) + (rOld.contains(inc) ? " came back" : " arrived")
                + " while " + u(rInc) + " is connected";
        long now = System.currentTimeMillis();
        if (!held || heldInc != inc) { held = true; heldInc = inc; heldSince = now; }
        // A restart looks the same until the previous run's connections are read to their end: only a claim that
        // outlasts that is two nodes (an error, at most one line a minute; the node's retries come every few s).
        if (now - heldSince < RESTART_WINDOW_MS) {
            log("a new run of the node is held back via " + via + " until its previous run's connections are gone (a restart;"
                    + " two running nodes if this lasts): " + why);
        } else if (now - dupReportedAt >= 60_000) {
            dupReportedAt = now;
            error(why);
        } else {
            log(why);
        }
        return why;
    }

    /** 9.7: c, read to its end, no longer holds its incarnation's place. */
    static void down(Conn c) {
        synchronized (R) { upConns.remove(c); }
    }

    // ------------------------------------------------------------------ acceptor role
    static void acceptLoop() {
        while (true) {
            Socket s;
            try {
                s = server.accept();
            } catch (IOException e) {
                synchronized (L) { if (shuttingDown) return; }
                log("accept failed: " + e);
                continue;
            }
            Thread t = new Thread(() -> handleInbound(s), "inbound");
            t.setDaemon(true);
            t.start();
        }
    }

    static boolean allowedSource(InetAddress a) {
        try {
            for (InetAddress x : InetAddress.getAllByName(stripBrackets(NODE_HOST))) if (x.equals(a)) return true;
        } catch (IOException ignored) {
        }
        return false;
    }

    static void handleInbound(Socket s) {
        InConn c;
        try {
            c = new InConn(s);
        } catch (IOException e) {
            try { s.close(); } catch (IOException ignored) { }
            return;
        }
        if (!allowedSource(s.getInetAddress())) {
            log("closing connection from " + s.getRemoteSocketAddress() + ": not the node's address");
            c.close();
            return;
        }
        synchronized (R) {
            if (shuttingDownNow()) { c.close(); return; }
            allIn.add(c);
        }
        try {
            if (!acceptorHandshake(c)) return;
            inboundReader(c);
        } finally {
            c.close();
            synchronized (R) {
                allIn.remove(c);
                upConns.remove(c); // only now: its reader took all it carried, a Goodbye included (9.7)
                if (currentIn == c) currentIn = null;
            }
        }
    }

    static boolean shuttingDownNow() {
        synchronized (L) { return shuttingDown; }
    }

    static boolean acceptorHandshake(InConn c) {
        long deadline = System.currentTimeMillis() + HANDSHAKE_MS;
        Msg h;
        try {
            h = c.readMsg(deadline);
        } catch (Timeout e) {
            error("inbound handshake: no hello before the deadline");
            c.reject("no hello before the deadline");
            return false;
        } catch (ProtoError e) {
            error("inbound handshake: bad first frame: " + e.getMessage());
            c.reject("bad first frame: " + e.getMessage());
            return false;
        } catch (IOException e) {
            log("inbound handshake: closed before saying hello (" + e.getMessage() + ")");
            c.reject("closed before saying hello");
            return false;
        }
        if (h.type != T_HELLO) {
            error("inbound handshake: expected Hello, got " + name(h.type));
            c.reject("expected Hello, got " + name(h.type));
            return false;
        }
        String why = checkHello(h, true);
        if (why != null) {
            error("inbound handshake refused: " + why);
            c.reject(why);
            return false;
        }
        // 7.2 step 1: what we hold for the node as an origin, read before anything is applied
        Msg resume = myResume();
        Msg mine = myHello();
        if (SECRET == null) {
            // Without a secret no proof follows: the incarnation rule (step 4) comes before our Hello, so that a
            // refused claimant learns nothing of the peer it claims to be; Hello and Resume then go together.
            if (!acceptIncarnation(c, h)) return false;
            try {
                c.writeFrames(frame(mine), List.of(encode(resume)));
            } catch (IOException e) {
                log("inbound handshake: write failed: " + e);
                return false;
            }
        } else {
            byte[] key = sessionKey(SECRET, h.nonce, mine.nonce);
            Msg a = Msg.of(T_AUTH);
            a.mac = hmac(SECRET, authMessage((byte) 'A', h, mine));
            try {
                c.write(concat(frame(mine), frame(a)));
            } catch (IOException e) {
                log("inbound handshake: write failed: " + e);
                return false;
            }
            c.tx = new Tagger(key, (byte) 'A'); // every frame after our Auth but a Reject is tagged (7.6)
            Msg d;
            try {
                d = c.readMsg(deadline);
            } catch (Timeout e) {
                error("inbound handshake: no proof of the shared secret before the deadline");
                c.reject("no proof of the shared secret before the deadline");
                return false;
            } catch (ProtoError e) {
                error("inbound handshake: bad frame where Auth was due: " + e.getMessage());
                c.reject("bad frame where Auth was due: " + e.getMessage());
                return false;
            } catch (IOException e) {
                log("inbound handshake: closed before Auth (" + e.getMessage() + ")");
                return false;
            }
            if (d.type == T_REJECT) {
                error("inbound handshake: node rejected us: " + d.reason);
                return false;
            }
            if (d.type != T_AUTH) {
                error("inbound handshake: expected Auth, got " + name(d.type));
                c.reject("expected Auth, got " + name(d.type));
                return false;
            }
            byte[] expect = hmac(SECRET, authMessage((byte) 'D', h, mine));
            if (!MessageDigest.isEqual(expect, d.mac)) {
                error("inbound handshake: authentication failed for " + h.node + ": wrong shared secret (cachecast.secret differs?)");
                c.reject("authentication failed for " + h.node + ": wrong shared secret (cachecast.secret differs?)");
                return false;
            }
            c.rx = new Tagger(key, (byte) 'D'); // the dialer tags everything after its Auth
            if (!acceptIncarnation(c, h)) return false;
            try {
                c.writeFrames(null, List.of(encode(resume))); // tagged, counter 0
            } catch (IOException e) {
                log("inbound handshake: write failed: " + e);
                return false;
            }
        }
        // 9.5: the node never sends what our Resume announced, or less, on this connection
        c.f = resume.hasLast && resume.lastInc == h.inc ? resume.lastSeq : 0;
        InConn old;
        synchronized (R) {
            old = currentIn;
            currentIn = c;
        }
        if (old != null) {
            log("superseding the older inbound connection");
            old.close();
        }
        log("inbound handshake complete: node " + h.node + " incarnation " + u(h.inc) + " (we announced "
                + pos(resume) + " digest " + toHex(resume.digest) + ")");
        out("inbound-up " + u(h.inc));
        Thread w = new Thread(() -> inboundWriter(c), "inbound-writer");
        w.setDaemon(true);
        w.start();
        return true;
    }

    /** 7.2 step 4 (9.7): a duplicate identity is refused with a Reject, never tagged. */
    static boolean acceptIncarnation(InConn c, Msg h) {
        String dup = applyIncarnation(c, h.inc, "inbound Hello");
        if (dup != null) {
            c.reject(dup); // logged by applyIncarnation
            return false;
        }
        c.helloInc = h.inc;
        return true;
    }

    static void inboundReader(InConn c) {
        long lastFrame = System.currentTimeMillis();
        long prevLast = -1; // last seq of the previous Batch on this connection (9.1), -1: none yet
        boolean resumed = false; // the dialer's Resume comes first, once (7.1, 8)
        try {
            while (true) {
                Msg m = c.readMsg(lastFrame + SILENCE_MS);
                lastFrame = System.currentTimeMillis();
                if (!resumed && m.type != T_RESUME) {
                    if (m.type == T_REJECT && c.rx == null) {
                        // 8: without secrets the dialer's Reject of 7.3 may come in place of its Resume: the end
                        error("inbound: node rejected us: " + m.reason);
                    } else {
                        error("inbound: expected the node's Resume, got " + name(m.type));
                    }
                    c.close();
                    return;
                }
                switch (m.type) {
                    case T_RESUME:
                        if (resumed) {
                            error("unexpected second Resume from the dialing node");
                            c.close();
                            return;
                        }
                        resumed = true;
                        // Informational for us (the reference uses it only for 9.9, which needs a state file).
                        checkResumeDigest(m, "the dialing node's");
                        log("inbound: the node holds " + pos(m) + " digest " + toHex(m.digest) + " for us");
                        break;
                    case T_BATCH: {
                        if (m.items.isEmpty()) {
                            // 9.1: a sender MUST NOT send an empty Batch; a receiver applies nothing from one.
                            error("node sent an empty Batch (first_seq " + u(m.firstSeq) + "; 9.1 forbids it)");
                        } else {
                            long last = m.firstSeq + m.items.size() - 1;
                            // Going backwards is divergence (9.5), reported by applyBatch.
                            if (prevLast != -1 && Long.compareUnsigned(m.firstSeq, prevLast + 1) > 0 && m.items.get(0).kind != I_FLUSH)
                                log("note: Batch first_seq " + u(m.firstSeq) + " skips after " + u(prevLast) + " without a Flush (9.1)");
                            prevLast = last;
                        }
                        if (!applyBatch(c, m)) return;
                        break;
                    }
                    case T_PING:
                        synchronized (c) { c.pongOwed = true; c.notifyAll(); }
                        break;
                    case T_GOODBYE: {
                        out("goodbye " + u(m.goodbyeSeq));
                        synchronized (R) {
                            if (rKnown && rInc == c.helloInc) {
                                rGoodbye = m.goodbyeSeq;
                                if (rFresh && Long.compareUnsigned(m.goodbyeSeq, rA) > 0) {
                                    rA = m.goodbyeSeq;
                                    rD = ZERO_DIGEST; // a set by a Goodbye: no item to fingerprint (9.5)
                                }
                            }
                        }
                        break;
                    }
                    default:
                        error("unexpected " + name(m.type) + " from the dialing node after the handshake");
                        c.close();
                        return;
                }
            }
        } catch (Timeout e) {
            if (!c.closed) error("inbound: no frame from the node for 3 s");
        } catch (ProtoError e) {
            if (!c.closed) error("inbound: " + e.getMessage());
        } catch (IOException e) {
            if (!c.closed) log("inbound connection closed: " + e.getMessage());
        }
    }

    static boolean applyBatch(InConn c, Msg m) {
        synchronized (R) {
            if (!rKnown || rInc != c.helloInc) {
                error("Batch on a connection whose incarnation " + u(c.helloInc) + " is no longer current");
                c.close();
                return false;
            }
            boolean lastApplied = false;
            for (int i = 0; i < m.items.size(); i++) {
                long s = m.firstSeq + i;
                Item it = m.items.get(i);
                if (Long.compareUnsigned(s, c.f) <= 0) {
                    // 9.5 divergence: the node sends what this connection may not carry. Skipping it as a duplicate
                    // could drop a real invalidation: flush, and follow the node's numbering.
                    divergences++;
                    error("divergence: the node sent seq " + u(s) + ", at or below " + u(c.f)
                            + ", what this connection may carry (9.5); flushing, a = " + u(s - 1));
                    if (it.kind != I_FLUSH) out("flush-local divergence");
                    rA = s - 1;
                    rD = ZERO_DIGEST;
                }
                c.f = s;
                if (Long.compareUnsigned(s, rA) <= 0) { lastApplied = false; continue; } // duplicate
                if (Long.compareUnsigned(s, rA + 1) > 0 && !rFresh && it.kind != I_FLUSH) {
                    log("gap: " + u(rA + 1) + ".." + u(s - 1) + " never delivered");
                    out("flush-local gap");
                }
                if (it.kind == I_KEY) out("key " + u(s) + " " + it.cache + " " + it.key);
                else if (it.kind == I_CACHE) out("cache " + u(s) + " " + it.cache);
                else out("flush " + u(s));
                rA = s;
                rFresh = false;
                rGoodbye = null;
                lastApplied = true;
            }
            // 9.5: the fingerprint is computed for the last item of a Batch only (once one item is applied, the
            // rest are too: seqs are consecutive), and announced in our next Resume.
            if (lastApplied) rD = fingerprint(rInc, rA, m.items.get(m.items.size() - 1));
            long[] pos = {c.helloInc, rA};
            synchronized (c) {
                c.ackPos = pos;
                c.notifyAll();
            }
        }
        return true;
    }

    static void inboundWriter(InConn c) {
        try {
            while (true) {
                List<byte[]> data = new ArrayList<>();
                synchronized (c) {
                    while (!c.closed && !c.pongOwed && (c.ackPos == null || Arrays.equals(c.ackPos, c.lastAckWritten))) c.wait();
                    if (c.closed) return;
                    if (c.ackPos != null && !Arrays.equals(c.ackPos, c.lastAckWritten)) {
                        Msg ack = Msg.of(T_ACK);
                        ack.ackInc = c.ackPos[0];
                        ack.ackSeq = c.ackPos[1];
                        data.add(encode(ack));
                        c.lastAckWritten = c.ackPos;
                    }
                    if (c.pongOwed) {
                        data.add(encode(Msg.of(T_PONG)));
                        c.pongOwed = false;
                    }
                }
                c.writeFrames(null, data);
            }
        } catch (InterruptedException | IOException e) {
            if (!c.closed) log("inbound writer: " + e);
            c.close();
        }
    }

    // ------------------------------------------------------------------ dialer role
    static String stripBrackets(String h) {
        return h.startsWith("[") && h.endsWith("]") ? h.substring(1, h.length() - 1) : h;
    }

    static Socket connect() throws IOException {
        IOException last = null;
        for (InetAddress a : InetAddress.getAllByName(stripBrackets(NODE_HOST))) {
            Socket s = new Socket();
            try {
                s.setTcpNoDelay(true);
                s.connect(new InetSocketAddress(a, NODE_PORT), (int) CONNECT_MS);
                return s;
            } catch (IOException e) {
                last = e;
                try { s.close(); } catch (IOException ignored) { }
            }
        }
        throw last != null ? last : new IOException("no address for " + NODE_HOST);
    }

    static void dialerLoop() {
        int n = 0;
        while (true) {
            synchronized (L) { if (shuttingDown) return; }
            OutConn c = null;
            try {
                Socket s = connect();
                c = new OutConn(s);
                synchronized (L) {
                    if (shuttingDown) { c.close(); return; }
                    dialing = c;
                }
                if (dialerHandshake(c)) {
                    n = 0;
                    runOutbound(c);
                }
            } catch (IOException e) {
                log("dial " + NODE + ": " + e.getMessage());
            } finally {
                if (c != null) {
                    c.close();
                    // 9.7: up until its reader is done with it (closed now, it ends at once)
                    if (c.reader != null) {
                        try { c.reader.join(); } catch (InterruptedException e) { Thread.currentThread().interrupt(); }
                    }
                    down(c);
                }
                synchronized (L) {
                    if (dialing == c) dialing = null;
                    if (outbound == c) outbound = null;
                    L.notifyAll();
                }
            }
            long wait = (long) (Math.min(100L << Math.min(n, 10), 5000L) * (0.8 + 0.4 * RNG.nextDouble()));
            n++;
            synchronized (L) {
                if (shuttingDown) return;
                try { L.wait(Math.max(1, wait)); } catch (InterruptedException e) { return; }
            }
        }
    }

    static boolean dialerHandshake(OutConn c) throws IOException {
        long deadline = System.currentTimeMillis() + HANDSHAKE_MS;
        Msg mine = myHello();
        c.write(frame(mine));
        Msg h;
        try {
            h = c.readMsg(deadline);
        } catch (Timeout e) {
            error("outbound handshake: no hello from the node before the deadline");
            return false;
        } catch (ProtoError e) {
            error("outbound handshake: bad first frame from the node: " + e.getMessage());
            return false;
        } catch (IOException e) {
            log("outbound handshake: node closed before saying hello (" + e.getMessage() + ")");
            return false;
        }
        if (h.type == T_REJECT) {
            error("outbound handshake: node rejected us: " + h.reason);
            return false;
        }
        if (h.type != T_HELLO) {
            error("outbound handshake: expected Hello, got " + name(h.type));
            return false;
        }
        String why = checkHello(h, false);
        if (why != null) {
            error("outbound handshake refused: " + why);
            c.reject(ID + " refuses: " + why);
            return false;
        }
        byte[] key = null, authD = null;
        if (SECRET != null) {
            Msg a;
            try {
                a = c.readMsg(deadline);
            } catch (Timeout e) {
                // 7.3: no Reject when the connection failed (deadline, close, undecodable frame)
                error("outbound handshake: no proof of the shared secret from the node before the deadline");
                return false;
            } catch (ProtoError e) {
                error("outbound handshake: bad frame where Auth was due: " + e.getMessage());
                return false;
            } catch (IOException e) {
                log("outbound handshake: closed before Auth (" + e.getMessage() + ")");
                return false;
            }
            if (a.type == T_REJECT) {
                error("outbound handshake: node rejected us: " + a.reason);
                return false;
            }
            if (a.type != T_AUTH) {
                error("outbound handshake: expected Auth, got " + name(a.type));
                c.reject(ID + " refuses: expected Auth, got " + name(a.type));
                return false;
            }
            byte[] expect = hmac(SECRET, authMessage((byte) 'A', mine, h));
            if (!MessageDigest.isEqual(expect, a.mac)) {
                String r = "authentication failed for " + h.node + ": wrong shared secret (cachecast.secret differs?)";
                error("outbound handshake: " + r);
                c.reject(ID + " refuses: " + r);
                return false;
            }
            key = sessionKey(SECRET, mine.nonce, h.nonce);
            Msg d = Msg.of(T_AUTH);
            d.mac = hmac(SECRET, authMessage((byte) 'D', mine, h));
            authD = frame(d); // written after the incarnation rule: every refusal precedes our Auth (7.3)
        }
        // 7.3: the position we hold for the node as an origin, read before anything is applied
        Msg resume = myResume();
        String dup = applyIncarnation(c, h.inc, "outbound Hello");
        if (dup != null) {
            c.reject(ID + " refuses: " + dup); // logged by applyIncarnation; a Reject, then close (7.3)
            return false;
        }
        if (key != null) {
            c.tx = new Tagger(key, (byte) 'D'); // our Resume is tagged frame 0
            c.rx = new Tagger(key, (byte) 'A');
        }
        c.writeFrames(authD, List.of(encode(resume)));
        Msg r;
        try {
            r = c.readResumeOrReject(deadline);
        } catch (Timeout e) {
            error("outbound handshake: no Resume from the node before the deadline");
            return false;
        } catch (ProtoError e) {
            error("outbound handshake: bad frame where the node's Resume was due: " + e.getMessage());
            return false;
        } catch (IOException e) {
            log("outbound handshake: closed before the node's Resume (" + e.getMessage() + ")");
            return false;
        }
        if (r.type == T_REJECT) {
            error("outbound handshake: node rejected us: " + r.reason);
            return false;
        }
        if (r.type != T_RESUME) {
            error("outbound handshake: expected Resume, got " + name(r.type));
            return false;
        }
        checkResumeDigest(r, "the accepting node's");
        synchronized (L) {
            if (shuttingDown) return false;
            long was = acked;
            long rp = resumePoint(r, h.inc);
            log("outbound handshake complete: node incarnation " + u(h.inc) + ", its Resume " + pos(r) + " digest "
                    + toHex(r.digest) + ", resuming after " + u(rp) + " (acked " + u(was) + ", last " + u(lastAssigned)
                    + ", front " + u(front) + ")");
            acked = rp;
            ackedRun = h.inc;
            c.peerInc = h.inc;
            c.sent = rp;
            trim();
            dialing = null;
            outbound = c;
            everUp = true;
            out("outbound-up");
            checkTargets();
            L.notifyAll();
        }
        return true;
    }

    /** Under L. 9.4: where to resume, from the acceptor's Resume; run is the incarnation in its Hello. */
    static long resumePoint(Msg res, long run) {
        boolean sameRun = ackedRun != null && ackedRun == run;
        if (!res.hasLast || res.lastInc != myInc) {
            // None from the run that raised acked went back (as rule 2); anything else holds nothing of this run.
            if (!res.hasLast && sameRun && acked != 0) {
                divergence("the node holds no position, below " + u(acked) + ", what the same run of it (incarnation "
                        + u(run) + ") acknowledged; resuming after 0");
                return 0;
            }
            return acked;
        }
        long ls = res.lastSeq;
        // 1. A position never given.
        if (Long.compareUnsigned(ls, lastAssigned) > 0) {
            divergence("the node holds " + pos(res) + ", beyond the highest seq assigned, " + u(lastAssigned));
            return acked;
        }
        // The item we know at ls: still held, or the synthetic Flush we wrote the node there (not any Flush: one a
        // claimant sent ahead of our numbering would cover nothing assigned after it).
        Item known = held(ls);
        if (known == null && ls != 0 && ls == flushedAt) known = Item.flush();
        boolean verified = ls == 0 || known != null && MessageDigest.isEqual(fingerprint(myInc, ls, known), res.digest);
        // 2. Within one run of the receiver what it applied never goes back. Unverified, it gets ls again: at or
        // below its position, so it flushes (9.5).
        if (sameRun && Long.compareUnsigned(ls, acked) < 0) {
            long r = verified ? ls : ls - 1;
            divergence("the node holds " + pos(res) + (verified ? "" : ", unverified,") + " below " + u(acked)
                    + ", what the same run of it (incarnation " + u(run) + ") acknowledged; resuming after " + u(r));
            return r;
        }
        // 3. Verified.
        if (verified) return Long.compareUnsigned(ls, acked) > 0 ? ls : acked;
        // 4. Still held, another fingerprint: something else applied under our numbers.
        if (held(ls) != null) {
            divergence("the node holds " + pos(res) + " with fingerprint " + toHex(res.digest) + ", ours is "
                    + toHex(fingerprint(myInc, ls, held(ls))));
            return acked;
        }
        // 5. Within what it acknowledged.
        if (Long.compareUnsigned(ls, acked) <= 0) return acked;
        // 6. No longer checkable, beyond what it acknowledged.
        divergence("the node holds " + pos(res) + ", an item not known here and beyond acked " + u(acked) + ": unverifiable");
        return acked;
    }

    /** Logged the way other findings are: the test fails on it (9.4: logged and counted, not believed). */
    static void divergence(String what) {
        divergences++;
        error("divergence (" + divergences + "): " + what + " (9.4)");
    }

    /** Under L: the item at seq s if the buffer still holds it, else null. */
    static Item held(long s) {
        if (s == 0 || Long.compareUnsigned(s, front) < 0 || Long.compareUnsigned(s, lastAssigned) > 0) return null;
        return ring[slot(s)];
    }

    static int slot(long s) { return (int) Long.remainderUnsigned(s, ring.length); }

    /** Under L: assigns the next seq; a full buffer drops its oldest entry (overflow, 9.2). */
    static void append(Item it) {
        if (lastAssigned + 1 - front == ring.length) {
            ring[slot(front)] = null;
            front++;
        }
        lastAssigned++;
        ring[slot(lastAssigned)] = it;
    }

    /** Under L: entries the node acknowledged are dropped (9.2; it is our only peer). */
    static void trim() {
        while (Long.compareUnsigned(front, acked) <= 0 && Long.compareUnsigned(front, lastAssigned) <= 0) {
            ring[slot(front)] = null;
            front++;
        }
    }

    /** Under L. */
    static void checkTargets() {
        while (everUp && !targets.isEmpty() && Long.compareUnsigned(targets.peekFirst(), acked) <= 0)
            out("acked " + u(targets.pollFirst()));
    }

    static void runOutbound(OutConn c) {
        Thread r = new Thread(() -> outboundReader(c), "outbound-reader");
        r.setDaemon(true);
        c.reader = r;
        r.start();
        long lastWrite = System.currentTimeMillis();
        try {
            while (true) {
                List<byte[]> data = null; // payloads, framed (and tagged) by writeFrames
                long newSent = -1;
                boolean isGoodbye = false;
                synchronized (L) {
                    while (true) {
                        if (c.closed) return;
                        if (c.goodbyeQueued) { L.wait(1000); continue; } // nothing may follow a Goodbye
                        long from = Long.compareUnsigned(c.sent, acked) >= 0 ? c.sent : acked;
                        long now = System.currentTimeMillis();
                        if (Long.compareUnsigned(from, lastAssigned) < 0) {
                            if (shuttingDown && now >= goodbyeDeadline) { L.wait(1000); continue; }
                            data = new ArrayList<>();
                            int size = 0;
                            long s = from + 1;
                            if (Long.compareUnsigned(s, front) < 0) {
                                // 9.3: entries the node needed were dropped; a local Flush at front stands for them,
                                // else a synthetic one numbered with the last dropped seq
                                Item atFront = held(front);
                                if (atFront == null || atFront.kind != I_FLUSH) {
                                    Msg b = Msg.of(T_BATCH);
                                    b.firstSeq = front - 1;
                                    b.items = new ArrayList<>(List.of(Item.flush()));
                                    byte[] p = encode(b);
                                    data.add(p);
                                    size += p.length;
                                    flushedAt = front - 1; // 9.4: a position there, with a Flush's fingerprint, is ours
                                    log("synthetic Flush " + u(front - 1) + " for " + u(s) + ".." + u(front - 1) + ", no longer held");
                                }
                                s = front;
                            }
                            while (Long.compareUnsigned(s, lastAssigned) <= 0 && size < 256 * 1024) {
                                Msg b = Msg.of(T_BATCH);
                                b.firstSeq = s;
                                b.items = new ArrayList<>();
                                long est = 0;
                                while (Long.compareUnsigned(s, lastAssigned) <= 0 && b.items.size() < BATCH && b.items.size() < 4096 && est < 64 * 1024) {
                                    Item it = held(s);
                                    b.items.add(it);
                                    est += it.kind == I_KEY ? 11 + utf8(it.cache).length + utf8(it.key).length
                                            : it.kind == I_CACHE ? 6 + utf8(it.cache).length : 1;
                                    s++;
                                }
                                byte[] p = encode(b);
                                data.add(p);
                                size += p.length;
                            }
                            newSent = s - 1;
                            break;
                        }
                        if (shuttingDown) {
                            if (now < goodbyeDeadline) {
                                Msg g = Msg.of(T_GOODBYE);
                                g.goodbyeSeq = lastAssigned;
                                data = List.of(encode(g));
                                isGoodbye = true;
                                log("writing Goodbye{" + u(lastAssigned) + "}");
                                break;
                            }
                            L.wait(1000);
                            continue;
                        }
                        long idle = now - lastWrite;
                        if (idle >= PING_IDLE_MS) { data = List.of(encode(Msg.of(T_PING))); break; }
                        L.wait(PING_IDLE_MS - idle);
                    }
                    if (newSent != -1) c.sent = newSent;
                    if (isGoodbye) c.goodbyeQueued = true;
                }
                c.writeFrames(null, data);
                lastWrite = System.currentTimeMillis();
                // Only once written may shutdown close the socket.
                if (isGoodbye) synchronized (L) { c.goodbyeSent = true; L.notifyAll(); }
            }
        } catch (InterruptedException e) {
            c.close();
        } catch (IOException e) {
            if (!c.closed) log("outbound write failed: " + e.getMessage());
            c.close();
        }
    }

    static void outboundReader(OutConn c) {
        long lastFrame = System.currentTimeMillis();
        try {
            while (true) {
                Msg m = c.readMsg(lastFrame + SILENCE_MS);
                lastFrame = System.currentTimeMillis();
                if (m.type == T_ACK) {
                    synchronized (L) {
                        if (c.closed) return; // superseded or closed: its Acks no longer move the cursor
                        if (m.ackInc != myInc) {
                            error("Ack of another incarnation: " + u(m.ackInc) + " (ours is " + u(myInc) + ")");
                            c.close();
                            return;
                        }
                        if (Long.compareUnsigned(m.ackSeq, lastAssigned) > 0) {
                            error("Ack seq " + u(m.ackSeq) + " beyond the highest seq assigned, " + u(lastAssigned));
                            c.close();
                            return;
                        }
                        if (Long.compareUnsigned(m.ackSeq, acked) > 0) {
                            acked = m.ackSeq;
                            ackedRun = c.peerInc;
                            trim();
                            checkTargets();
                            L.notifyAll();
                        }
                    }
                } else if (m.type == T_PONG) {
                    // traffic; nothing else to do
                } else if (m.type == T_REJECT) {
                    // 8: a Reject after the sender's Resume is a protocol error (and would have failed its tag)
                    error("node sent Reject after its Resume: " + m.reason);
                    c.close();
                    return;
                } else {
                    error("unexpected " + name(m.type) + " from the accepting node after the handshake");
                    c.close();
                    return;
                }
            }
        } catch (Timeout e) {
            if (!c.closed) error("outbound: no frame from the node for 3 s");
        } catch (ProtoError e) {
            if (!c.closed) error("outbound: " + e.getMessage());
        } catch (IOException e) {
            if (!c.closed) log("outbound connection closed: " + e.getMessage());
        } finally {
            c.close();
            synchronized (L) { L.notifyAll(); }
        }
    }

    // ------------------------------------------------------------------ commands
    static void send(long k) {
        synchronized (L) {
            if (shuttingDown) return;
            for (long i = 0; i < k; i++) append(Item.key("org.hisp.dhis.user.User", "java-" + u(lastAssigned + 1)));
            targets.addLast(lastAssigned);
            checkTargets();
            L.notifyAll();
        }
    }

    static void goodbye() {
        List<InConn> ins;
        OutConn out;
        synchronized (L) {
            shuttingDown = true;
            goodbyeDeadline = System.currentTimeMillis() + GOODBYE_MS;
            if (dialing != null) dialing.close();
            L.notifyAll();
        }
        try { server.close(); } catch (IOException ignored) { }
        synchronized (R) { ins = new ArrayList<>(allIn); }
        for (InConn c : ins) c.close();
        synchronized (L) {
            out = outbound;
            try {
                while (out != null && !out.closed) {
                    if (out.goodbyeSent && Long.compareUnsigned(acked, lastAssigned) >= 0) break;
                    long rem = goodbyeDeadline - System.currentTimeMillis();
                    if (rem <= 0) break;
                    L.wait(rem);
                }
            } catch (InterruptedException ignored) {
            }
            if (out != null) log("shutdown: goodbye " + (out.goodbyeSent ? "sent" : "not sent") + ", acked " + u(acked) + " of " + u(lastAssigned));
        }
        if (out != null) out.close();
        out("bye");
        System.exit(0);
    }

    // ------------------------------------------------------------------ self-test (section 12)
    static byte[] hex(String text) {
        StringBuilder sb = new StringBuilder();
        for (String line : text.split("\n")) {
            int h = line.indexOf('#');
            if (h >= 0) line = line.substring(0, h);
            for (char ch : line.toCharArray()) if (!Character.isWhitespace(ch)) sb.append(ch);
        }
        String s = sb.toString();
        if (s.length() % 2 != 0) throw new IllegalArgumentException("odd number of hex digits");
        byte[] r = new byte[s.length() / 2];
        for (int i = 0; i < r.length; i++) r[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        return r;
    }

    static String toHex(byte[] b) {
        StringBuilder sb = new StringBuilder();
        for (byte x : b) sb.append(String.format("%02x", x & 0xff));
        return sb.toString();
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new IllegalStateException(what);
    }

    static byte[] seqBytes(int from, int n, int step) {
        byte[] r = new byte[n];
        for (int i = 0; i < n; i++) r[i] = (byte) (from + step * i);
        return r;
    }

    static byte[] fill(int v) { byte[] r = new byte[32]; Arrays.fill(r, (byte) v); return r; }

    static void expectError(String hexPayload, String what) {
        try {
            decode(hex(hexPayload));
        } catch (ProtoError e) {
            return;
        }
        throw new IllegalStateException("decoder accepted " + what + ": " + hexPayload);
    }

    /** 12.5: session key, the dialer's tagged Resume, the acceptor's tagged Ack (counter 1); a bad tag fails. */
    static void selftestTags(byte[] secret) throws Exception {
        byte[] k = sessionKey(secret, fill(0xaa), fill(0xbb));
        check(toHex(k).equals("0331d2edf63c2ae5d7e70d5886b032babdad08b7032282900937ba86dbc921f7"), "12.5 session key " + toHex(k));
        Msg r = Msg.of(T_RESUME);
        r.digest = ZERO_DIGEST.clone();
        Tagger dTx = new Tagger(k, (byte) 'D');
        byte[] rp = encode(r);
        String dFrame = toHex(frameOf(rp, dTx.next(rp, rp.length)));
        check(dFrame.equals("00000022080000000000000000000000000000000000fc8b1db1a4408a381d82b8441c094f81"), "12.5 dialer Resume " + dFrame);
        Tagger aTx = new Tagger(k, (byte) 'A');
        aTx.counter = 1; // after its Resume
        Msg ack = Msg.of(T_ACK);
        ack.ackInc = 65536; ack.ackSeq = 41;
        byte[] ap = encode(ack);
        check(toHex(ap).equals("03fc0000010029"), "12.5 Ack payload");
        byte[] aFrame = frameOf(ap, aTx.next(ap, ap.length));
        check(toHex(aFrame).equals("0000001703fc000001002937763cb81f973a690d1e69ca753a19e0"), "12.5 acceptor Ack " + toHex(aFrame));
        // The receiving side: the dialer's Resume verifies at counter 0, the Ack at the acceptor's counter 1.
        Tagger dRx = new Tagger(k, (byte) 'D');
        check(decode(unseal(dRx, Arrays.copyOfRange(hex(dFrame), 4, 38))).type == T_RESUME, "12.5 unseal Resume");
        Tagger aRx = new Tagger(k, (byte) 'A');
        aRx.counter = 1;
        check(decode(unseal(aRx, Arrays.copyOfRange(aFrame, 4, aFrame.length))).ackSeq == 41, "12.5 unseal Ack");
        // A flipped bit, the wrong counter (replayed, reordered), the wrong role (reflected), too short: refused.
        byte[] bad = Arrays.copyOfRange(aFrame, 4, aFrame.length);
        bad[bad.length - 1] ^= 1;
        Tagger t1 = new Tagger(k, (byte) 'A');
        t1.counter = 1;
        expectTagError(t1, bad, "a flipped tag bit");
        expectTagError(new Tagger(k, (byte) 'A'), Arrays.copyOfRange(aFrame, 4, aFrame.length), "counter 0 for frame 1");
        Tagger t2 = new Tagger(k, (byte) 'D');
        t2.counter = 1;
        expectTagError(t2, Arrays.copyOfRange(aFrame, 4, aFrame.length), "the dialer's role on the acceptor's frame");
        expectTagError(new Tagger(k, (byte) 'D'), new byte[TAG], "a frame of 16 bytes");
        expectTagError(new Tagger(k, (byte) 'D'), Arrays.copyOfRange(hex(dFrame), 4, 20), "a frame shorter than a tag");
        log("selftest: 12.5 frame tags ok");
    }

    static void expectTagError(Tagger rx, byte[] p, String what) {
        try {
            unseal(rx, p);
        } catch (ProtoError e) {
            return;
        }
        throw new IllegalStateException("tag accepted: " + what);
    }

    /** 12.6: fingerprints; the item is re-encoded canonically whatever form it arrived in. */
    static void selftestFingerprints() throws Exception {
        Item k = Item.key("org.hisp.dhis.user.User", "xE7jOejl9FI");
        Enc e = new Enc();
        encodeItem(e, k);
        check(toHex(e.o.toByteArray()).equals("0017" + toHex(utf8("org.hisp.dhis.user.User")) + "0b" + toHex(utf8("xE7jOejl9FI"))), "12.6 item encoding");
        check(toHex(fingerprint(0x0123456789abcdefL, 42, k)).equals("bbd3331d759de109335d5703466d11f0"), "12.6 Key fingerprint "
                + toHex(fingerprint(0x0123456789abcdefL, 42, k)));
        check(toHex(fingerprint(0x0123456789abcdefL, 43, Item.flush())).equals("ff29c57e7f597c7acae7aa33466a412d"), "12.6 Flush fingerprint "
                + toHex(fingerprint(0x0123456789abcdefL, 43, Item.flush())));
        // A Flush item index in a longer form (fb 02 00) is the same item: the same fingerprint.
        Msg b = decode(hex("02" + "2b" + "01" + "fb0200"));
        check(toHex(fingerprint(0x0123456789abcdefL, 43, b.items.get(0))).equals("ff29c57e7f597c7acae7aa33466a412d"), "12.6 canonical form");
        log("selftest: 12.6 fingerprints ok");
    }

    /** 9.4: the resume point from an acceptor's Resume, case by case, on a small buffer. */
    static void selftestResume() {
        long inc = 0x0123456789abcdefL, run = 77, otherRun = 78;
        quietFindings = true; // the divergences provoked here are expected; stderr still shows them
        try {
            synchronized (L) {
                myInc = inc;
                // seqs 1..10 assigned; a buffer of 4 holds 7..10
                ring = new Item[4];
                front = 1; lastAssigned = 0;
                for (int i = 1; i <= 10; i++) append(Item.key("c", "k" + i));
                check(front == 7 && held(6) == null && held(7) != null && held(11) == null, "ring bounds");
                acked = 3; ackedRun = run; flushedAt = 0;
                long dv = divergences;
                // 3. verified: held, right fingerprint
                check(resumePoint(resume(inc, 8, fingerprint(inc, 8, held(8))), run) == 8 && divergences == dv, "9.4 verified");
                // 4. held, wrong fingerprint: divergence, from acked
                check(resumePoint(resume(inc, 8, fingerprint(inc, 9, held(9))), run) == 3 && divergences == ++dv, "9.4 wrong fingerprint");
                // 1. beyond last: divergence
                check(resumePoint(resume(inc, 11, ZERO_DIGEST), run) == 3 && divergences == ++dv, "9.4 beyond last");
                // 6. not known, beyond acked: unverifiable, divergence
                check(resumePoint(resume(inc, 5, ZERO_DIGEST), run) == 3 && divergences == ++dv, "9.4 unverifiable");
                // front - 1 = 6 with a Flush's fingerprint, but no synthetic Flush was written there: unverifiable
                check(resumePoint(resume(inc, 6, fingerprint(inc, 6, Item.flush())), run) == 3 && divergences == ++dv,
                        "9.4 Flush never written");
                // the synthetic Flush we wrote the node at 6 is known; a Flush elsewhere is not
                flushedAt = 6;
                check(resumePoint(resume(inc, 6, fingerprint(inc, 6, Item.flush())), run) == 6 && divergences == dv, "9.4 synthetic Flush verified");
                check(resumePoint(resume(inc, 6, ZERO_DIGEST), run) == 3 && divergences == ++dv, "9.4 synthetic Flush, wrong digest");
                check(resumePoint(resume(inc, 5, fingerprint(inc, 5, Item.flush())), run) == 3 && divergences == ++dv,
                        "9.4 a Flush where none was written");
                // 5. not known, at or below acked: taken
                check(resumePoint(resume(inc, 3, ZERO_DIGEST), run) == 3 && divergences == dv, "9.4 at acked, unknown");
                check(resumePoint(resume(inc, 2, ZERO_DIGEST), otherRun) == 3 && divergences == dv, "9.4 below acked, a restarted receiver");
                // another incarnation, None from another run, seq 0: from acked
                check(resumePoint(resume(inc + 1, 9, ZERO_DIGEST), run) == 3 && divergences == dv, "9.4 another incarnation");
                check(resumePoint(resume(inc, 0, ZERO_DIGEST), otherRun) == 3 && divergences == dv, "9.4 seq 0, another run");
                Msg none = Msg.of(T_RESUME);
                none.digest = ZERO_DIGEST;
                check(resumePoint(none, otherRun) == 3 && divergences == dv, "9.4 None, another run");
                // 2. below what the same run acknowledged: divergence, from the announced position if verified, else
                // one below it (the node gets that seq again and flushes)
                check(resumePoint(resume(inc, 2, ZERO_DIGEST), run) == 1 && divergences == ++dv, "9.4 below acked, unverified");
                check(resumePoint(none, run) == 0 && divergences == ++dv, "9.4 None from the same run");
                check(resumePoint(resume(inc, 0, ZERO_DIGEST), run) == 0 && divergences == ++dv, "9.4 seq 0 from the same run");
                acked = 9;
                check(resumePoint(resume(inc, 8, fingerprint(inc, 8, held(8))), run) == 8 && divergences == ++dv, "9.4 below acked, verified");
                check(resumePoint(resume(inc, 6, fingerprint(inc, 6, Item.flush())), run) == 6 && divergences == ++dv,
                        "9.4 below acked, at the synthetic Flush");
                // rule 2 comes before the fingerprint check of rule 4
                check(resumePoint(resume(inc, 8, fingerprint(inc, 9, held(9))), run) == 7 && divergences == ++dv,
                        "9.4 below acked, wrong fingerprint");
                // from another run: 4 is divergence at or below acked too; 3 and 5 take acked
                check(resumePoint(resume(inc, 8, fingerprint(inc, 9, held(9))), otherRun) == 9 && divergences == ++dv,
                        "9.4 wrong fingerprint below acked, another run");
                check(resumePoint(resume(inc, 8, fingerprint(inc, 8, held(8))), otherRun) == 9 && divergences == dv,
                        "9.4 verified below acked, another run");
                check(resumePoint(resume(inc, 5, ZERO_DIGEST), otherRun) == 9 && divergences == dv, "9.4 unknown below acked, another run");
                // a local Flush at front: no synthetic one was written, so front - 1 is unknown
                ring = new Item[4];
                front = 1; lastAssigned = 0; flushedAt = 0;
                for (int i = 1; i <= 6; i++) append(i == 3 ? Item.flush() : Item.key("c", "k" + i));
                check(front == 3 && held(3).kind == I_FLUSH, "local Flush at front");
                acked = 1;
                check(resumePoint(resume(inc, 2, fingerprint(inc, 2, Item.flush())), run) == 1 && divergences == ++dv, "9.4 no synthetic Flush");
            }
        } finally {
            quietFindings = false;
            synchronized (L) {
                ring = null; front = 1; lastAssigned = 0; acked = 0; ackedRun = null; divergences = 0; flushedAt = 0;
            }
        }
        log("selftest: 9.4 resume points ok");
    }

    /**
     * 7.2 step 1, 9.9: while nothing of the node's current incarnation arrived, our Resume reports what we held for
     * the one it replaced; once something did, the current position; a third run follows the second's own record.
     * 9.7: another incarnation waits while a connection of the current one is up.
     */
    static void selftestReplaced() throws Exception {
        PrintStream realOut = OUT;
        ByteArrayOutputStream captured = new ByteArrayOutputStream();
        OUT = new PrintStream(captured, true, "UTF-8"); // the applied items and flushes are not the selftest's output
        try {
            Item a = Item.key("c", "a"), b = Item.key("c", "b"), c = Item.key("c", "c");
            check(!myResume().hasLast && Arrays.equals(myResume().digest, ZERO_DIGEST), "7.2 no Hello accepted: None");
            check(applyIncarnation(null, 5, "selftest") == null, "first incarnation");
            check(sameResume(myResume(), 5, 0, ZERO_DIGEST), "7.2 first incarnation, nothing replaced: (5, 0)");
            check(applyBatch(stubIn(5), batch(1, a, b)), "apply 5/1..2");
            check(sameResume(myResume(), 5, 2, fingerprint(5, 2, b)), "7.2 after applying: (5, 2)");
            check(applyIncarnation(null, 6, "selftest") == null, "second incarnation");
            check(sameResume(myResume(), 5, 2, fingerprint(5, 2, b)), "7.2 nothing of 6 yet: what 5 held");
            // a fresh run's first Batch may start anywhere (9.5): once it applied, the current position again
            check(applyBatch(stubIn(6), batch(4, c)), "apply 6/4");
            check(sameResume(myResume(), 6, 4, fingerprint(6, 4, c)), "7.2 something of 6 applied: (6, 4)");
            check(applyIncarnation(null, 7, "selftest") == null, "third incarnation");
            check(sameResume(myResume(), 6, 4, fingerprint(6, 4, c)), "7.2 a third run follows the second, not the first");
            // 7 replaced while fresh: its own record (7, 0) is remembered, not the (6, 4) it reported
            check(applyIncarnation(null, 8, "selftest") == null, "fourth incarnation");
            check(sameResume(myResume(), 7, 0, ZERO_DIGEST), "7.2 a fresh run replaced: its own record");
            // 9.7: while a connection of the current incarnation is up, any other is refused and changes nothing,
            // the report included; the connection holds its place until down
            InConn up = stubIn(8);
            check(applyIncarnation(up, 8, "selftest") == null && upConns.contains(up), "9.7 the current incarnation's Hello");
            check(applyIncarnation(null, 9, "selftest") != null, "9.7 a new incarnation held back while 8 is up");
            check(applyIncarnation(null, 6, "selftest") != null, "9.7 a replaced incarnation refused while 8 is up");
            check(sameResume(myResume(), 7, 0, ZERO_DIGEST), "7.2 a refused Hello changes nothing");
            check(applyIncarnation(null, 8, "selftest") == null, "9.7 the held incarnation again, on another connection");
            down(up);
            check(upConns.isEmpty(), "9.7 down");
            // once 8 is down, a replaced incarnation coming back is let in, with a flush whatever 8 said (Goodbye)
            synchronized (R) { rGoodbye = 0L; }
            check(applyIncarnation(null, 6, "selftest") == null, "9.7 a replaced incarnation let in once 8 is down");
            check(sameResume(myResume(), 8, 0, ZERO_DIGEST), "7.2 nothing of 6 yet: what 8 held");
            String lines = captured.toString("UTF-8");
            check(lines.split("flush-local new-incarnation", -1).length - 1 == 4, "9.7 one flush per unclean restart or return: " + lines);
        } finally {
            OUT = realOut;
            synchronized (R) {
                rKnown = false; rFresh = false; rInc = 0; rA = 0; rD = ZERO_DIGEST; rGoodbye = null; rOld.clear();
                rPrevInc = 0; rPrevA = 0; rPrevD = null;
                upConns.clear(); held = false;
            }
        }
        log("selftest: 7.2 the position of a replaced incarnation ok");
    }

    static boolean sameResume(Msg r, long inc, long seq, byte[] digest) {
        return r.type == T_RESUME && r.hasLast && r.lastInc == inc && r.lastSeq == seq && Arrays.equals(r.digest, digest);
    }

    static Msg batch(long firstSeq, Item... items) {
        Msg m = Msg.of(T_BATCH);
        m.firstSeq = firstSeq;
        m.items = new ArrayList<>(List.of(items));
        return m;
    }

    /** An inbound connection over no socket: applyBatch only records on it the position to acknowledge. */
    static InConn stubIn(long helloInc) throws IOException {
        InConn c = new InConn(new Socket() {
            @Override public void setTcpNoDelay(boolean on) {}
            @Override public InputStream getInputStream() { return InputStream.nullInputStream(); }
            @Override public OutputStream getOutputStream() { return OutputStream.nullOutputStream(); }
        });
        c.helloInc = helloInc;
        return c;
    }

    static Msg resume(long inc, long seq, byte[] digest) {
        Msg r = Msg.of(T_RESUME);
        r.hasLast = true; r.lastInc = inc; r.lastSeq = seq; r.digest = digest;
        return r;
    }

    static int selftest(String dir) throws Exception {
        List<Path> files;
        try (Stream<Path> st = Files.list(Paths.get(dir))) {
            files = st.filter(p -> p.toString().endsWith(".hex")).sorted().collect(Collectors.toList());
        }
        check(!files.isEmpty(), "no .hex files in " + dir);
        // 12.3: every listed vector must be there, not only those found
        List<String> missing = new ArrayList<>(List.of("hello.hex", "hello_no_position.hex", "auth.hex", "batch.hex", "ack.hex",
                "ping.hex", "pong.hex", "goodbye.hex", "reject.hex", "resume.hex", "resume_none.hex"));
        for (Path f : files) {
            missing.remove(f.getFileName().toString());
            byte[] fr = hex(new String(Files.readAllBytes(f), StandardCharsets.UTF_8));
            check(fr.length >= 4, f + ": shorter than a length prefix");
            long n = ByteBuffer.wrap(fr).getInt() & 0xFFFFFFFFL;
            check(n == fr.length - 4, f + ": length prefix " + n + " but " + (fr.length - 4) + " payload bytes");
            Msg m = decode(Arrays.copyOfRange(fr, 4, fr.length));
            byte[] again = frame(m);
            check(Arrays.equals(fr, again), f + ": re-encoding differs: " + toHex(again));
            String name = f.getFileName().toString();
            switch (name) {
                case "hello.hex":
                    check(m.type == T_HELLO && m.version == 1 && m.node.equals("app1.example.org:4001") && m.inc == 0x0123456789abcdefL
                            && Arrays.equals(m.nonce, seqBytes(0, 32, 1)) && m.hasLast && m.lastInc == 3000000000L && m.lastSeq == 300 && !m.auth, name);
                    break;
                case "hello_no_position.hex":
                    check(m.type == T_HELLO && m.node.equals("10.0.0.2:4001") && m.inc == 65536 && !m.hasLast && m.auth
                            && Arrays.equals(m.nonce, fill(0xaa)), name);
                    break;
                case "auth.hex":
                    check(m.type == T_AUTH && Arrays.equals(m.mac, seqBytes(0xff, 32, -1)), name);
                    break;
                case "batch.hex":
                    check(m.type == T_BATCH && m.firstSeq == 1000 && m.items.size() == 3
                            && m.items.get(0).kind == I_KEY && m.items.get(0).cache.equals("org.hisp.dhis.user.User")
                            && m.items.get(0).key.equals("caf\u00e9\uD83D\uDD11")
                            && m.items.get(1).kind == I_CACHE && m.items.get(1).cache.equals("org.hisp.dhis.dataelement.DataElement")
                            && m.items.get(2).kind == I_FLUSH, name);
                    break;
                case "ack.hex":
                    check(m.type == T_ACK && m.ackInc == 0x0123456789abcdefL && m.ackSeq == 1002, name);
                    break;
                case "ping.hex":
                    check(m.type == T_PING, name);
                    break;
                case "pong.hex":
                    check(m.type == T_PONG, name);
                    break;
                case "goodbye.hex":
                    check(m.type == T_GOODBYE && m.goodbyeSeq == 70000, name);
                    break;
                case "reject.hex":
                    check(m.type == T_REJECT && m.reason.equals("unknown peer: 10.0.0.9:4001"), name);
                    break;
                case "resume.hex":
                    check(m.type == T_RESUME && m.hasLast && m.lastInc == 0x0123456789abcdefL && m.lastSeq == 1002
                            && Arrays.equals(m.digest, seqBytes(0, 16, 0x11)), name);
                    break;
                case "resume_none.hex":
                    check(m.type == T_RESUME && !m.hasLast && Arrays.equals(m.digest, ZERO_DIGEST), name);
                    break;
                default:
                    log("selftest: no expectations for " + name + " (round trip only)");
            }
            log("selftest: " + name + " ok");
        }
        check(missing.isEmpty(), "vectors missing from " + dir + ": " + missing);
        // 12.4 (its Hellos say version 1: the proof's layout is the same in version 2)
        Msg d = Msg.of(T_HELLO);
        d.version = 1; d.node = "10.0.0.2:4001"; d.nonce = fill(0xaa); d.inc = 65536; d.auth = true;
        Msg a = Msg.of(T_HELLO);
        a.version = 1; a.node = "10.0.0.1:4001"; a.nonce = fill(0xbb); a.inc = 0x0123456789abcdefL; a.auth = true;
        a.hasLast = true; a.lastInc = 65536; a.lastSeq = 41;
        byte[] key = "0123456789abcdef".getBytes(StandardCharsets.UTF_8);
        byte[] msgA = authMessage((byte) 'A', d, a);
        check(msgA.length == 157, "12.4 message length " + msgA.length);
        check(toHex(hmac(key, msgA)).equals("633202226e67fbc06396669194811d46b2401b31b906f925e79b956f61df139a"), "12.4 mac_A");
        check(toHex(hmac(key, authMessage((byte) 'D', d, a))).equals("1dabd017ebd582fac711255bc4e728a045a14b801e579d10c024fd58b1563e46"), "12.4 mac_D");
        Msg af = Msg.of(T_AUTH);
        af.mac = hmac(key, msgA);
        check(toHex(frame(af)).startsWith("000000210163320222"), "12.4 frame");
        selftestTags(key);
        selftestFingerprints();
        selftestResume();
        selftestReplaced();
        // 4.2 varint examples
        long[] vs = {0, 250, 251, 300, 65535, 65536, 4294967295L, 4294967296L, -1L};
        String[] hs = {"00", "fa", "fbfb00", "fb2c01", "fbffff", "fc00000100", "fcffffffff", "fd0000000001000000", "fdffffffffffffffff"};
        for (int i = 0; i < vs.length; i++) {
            Enc e = new Enc();
            e.varint(vs[i]);
            check(toHex(e.o.toByteArray()).equals(hs[i]), "varint " + u(vs[i]));
            Dec dd = new Dec(hex(hs[i]));
            check(dd.varint(0xfd, "v") == vs[i] && dd.remaining() == 0, "varint decode " + hs[i]);
        }
        // error cases of sections 3, 4, 6
        check(decode(hex("06fb0500")).goodbyeSeq == 5, "longer varint form accepted");
        expectError("", "empty payload");
        expectError("09", "unknown index");
        expectError("08", "truncated Resume");
        expectError("0802" + "00".repeat(16), "Resume Option byte 02");
        expectError("0800" + "00".repeat(15), "Resume digest of 15 bytes");
        expectError("0800" + "00".repeat(17), "Resume with a trailing byte");
        expectError("0801fe00" + "00".repeat(16), "Resume incarnation fe");
        check(decode(hex("fb0800" + "00" + "00".repeat(16))).type == T_RESUME, "longer index form of Resume accepted");
        expectError("0405", "trailing bytes");
        expectError("06fe", "fe marker");
        expectError("06ff", "ff marker");
        expectError("06fc0100", "truncated varint");
        expectError("0743434354fc01000000", "bad");
        expectError("0002c080", "overlong utf-8");
        expectError("0003eda080", "surrogate");
        expectError("0004f4908080", "above U+10FFFF");
        expectError("0001c1", "c1");
        expectError("0001f5", "f5");
        expectError("000180", "stray continuation");
        expectError("0002e282", "truncated utf-8");
        check(decode(hex("070100")).reason.equals("\u0000"), "U+0000 allowed");
        expectError("020001", "first_seq 0");
        expectError("0201010100", "empty cache name");
        expectError("02fdffffffffffffffff020202", "seq overflow");
        check(decode(hex("02fdffffffffffffffff0102")).items.size() == 1, "last seq 2^64-1 allowed");
        expectError("0243434354fc0100000000", "version wider than u16");
        expectError("0043434354fc01000000", "version marker fc in u16");
        expectError("0301", "truncated Ack");
        expectError("03fe0000", "Ack fe");
        expectError("0101", "short Auth");
        expectError("0202fd" + "0100000000000000", "count beyond payload");
        expectError("0102", "bad");
        expectError("fd0400000000000000", "index wider than u32");
        check(decode(hex("fb0400")).type == T_PING, "longer index form accepted");
        // Hello with bool 02 / Option 02
        String hello = "0043435354" + "01" + "01" + "61" + "05" + toHex(fill(0));
        check(decode(hex(hello + "0000")).node.equals("a"), "hello ok");
        expectError(hello + "0002", "auth bool 02");
        expectError(hello + "0200", "option 02");
        // node length 513
        StringBuilder longNode = new StringBuilder("0043435354" + "01" + "fb0102");
        for (int i = 0; i < 513; i++) longNode.append("61");
        expectError(longNode + "05" + toHex(fill(0)) + "0000", "node 513 bytes");
        out("selftest ok");
        return 0;
    }

    // ------------------------------------------------------------------ main
    public static void main(String[] args) throws Exception {
        OUT = new PrintStream(new FileOutputStream(FileDescriptor.out), false, "UTF-8");
        String vectors = "proto/vectors";
        boolean selftest = false;
        long sendN = 0;
        String secret = null;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            switch (a) {
                case "--selftest": selftest = true; break;
                case "--vectors": vectors = args[++i]; break;
                case "--id": ID = args[++i]; break;
                case "--node": NODE = args[++i]; break;
                case "--send": sendN = Long.parseLong(args[++i]); break;
                case "--secret": secret = args[++i]; break;
                case "--batch": BATCH = Integer.parseInt(args[++i]); break;
                case "--buffer": CAPACITY = Integer.parseInt(args[++i]); break;
                default:
                    System.err.println("unknown argument " + a);
                    System.exit(2);
            }
        }
        if (selftest) {
            try {
                System.exit(selftest(vectors));
            } catch (Throwable t) {
                System.err.println("selftest failed: " + t);
                System.exit(1);
            }
        }
        if (ID == null || NODE == null || BATCH < 1 || CAPACITY < 1) {
            System.err.println("usage: Peer --id HOST:PORT --node HOST:PORT [--send N] [--secret S] [--batch B] [--buffer C] | --selftest --vectors DIR");
            System.exit(2);
        }
        if (secret != null) SECRET = secret.getBytes(StandardCharsets.UTF_8);
        ID_PORT = Integer.parseInt(ID.substring(ID.lastIndexOf(':') + 1));
        NODE_HOST = NODE.substring(0, NODE.lastIndexOf(':'));
        NODE_PORT = Integer.parseInt(NODE.substring(NODE.lastIndexOf(':') + 1));

        do { myInc = RNG.nextLong(); } while (myInc == 0);
        out("incarnation " + u(myInc));

        server = new ServerSocket();
        server.setReuseAddress(true);
        server.bind(new InetSocketAddress(InetAddress.getByName("127.0.0.1"), ID_PORT), 64);

        synchronized (L) {
            ring = new Item[CAPACITY];
            for (long i = 1; i <= sendN; i++) append(Item.key("org.hisp.dhis.user.User", "java-" + i));
            targets.addLast(sendN);
        }
        Thread acc = new Thread(Peer::acceptLoop, "acceptor");
        acc.setDaemon(true);
        acc.start();
        Thread dial = new Thread(Peer::dialerLoop, "dialer");
        dial.setDaemon(true);
        dial.start();

        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            line = line.trim();
            if (line.isEmpty()) continue;
            String[] w = line.split("\\s+");
            if (w[0].equals("send") && w.length == 2) send(Long.parseLong(w[1]));
            else if (w[0].equals("goodbye")) goodbye();
            else if (w[0].equals("crash")) { OUT.flush(); Runtime.getRuntime().halt(3); }
            else log("unknown command: " + line);
        }
        goodbye();
    }
}
