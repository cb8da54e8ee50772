// Independent cachecast peer (protocol version 1), written from proto/PROTOCOL.md alone.
//
// Run:       java tests/interop/Peer.java --id 127.0.0.1:23002 --node 127.0.0.1:23001 [--send N] [--secret S] [--batch B]
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
    static final int T_HELLO = 0, T_AUTH = 1, T_BATCH = 2, T_ACK = 3, T_PING = 4, T_PONG = 5, T_GOODBYE = 6, T_REJECT = 7;
    static final String[] NAMES = {"Hello", "Auth", "Batch", "Ack", "Ping", "Pong", "Goodbye", "Reject"};
    static final int I_KEY = 0, I_CACHE = 1, I_FLUSH = 2;
    static final byte[] MAGIC = {0x43, 0x43, 0x53, 0x54};
    static final int MAX_NODE = 512, MAX_NAME = 65_536, MAX_REASON = 65_536;
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
        int version = 1;
        String node;
        long inc;
        byte[] nonce;
        boolean hasLast;
        long lastInc, lastSeq;
        boolean auth;
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
        if (idx > 7) throw new ProtoError("unknown message index " + u(idx));
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
                for (Item it : m.items) {
                    e.varint(it.kind);
                    if (it.kind == I_KEY) { e.str(it.cache, 1, MAX_NAME, "cache"); e.str(it.key, 0, MAX_NAME, "key"); }
                    else if (it.kind == I_CACHE) e.str(it.cache, 1, MAX_NAME, "cache");
                }
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
            default:
                throw new IllegalArgumentException("type " + m.type);
        }
        return e.o.toByteArray();
    }

    static byte[] frame(Msg m) {
        byte[] p = encode(m);
        if (p.length > MAX_FRAME) throw new IllegalArgumentException("frame too large");
        byte[] f = new byte[4 + p.length];
        ByteBuffer.wrap(f).putInt(p.length);
        System.arraycopy(p, 0, f, 4, p.length);
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

    // ------------------------------------------------------------------ output
    static PrintStream OUT;

    static void out(String line) {
        synchronized (Peer.class) {
            OUT.print(line + "\n");
            OUT.flush();
        }
    }

    static void error(String desc) {
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
    static final SecureRandom RNG = new SecureRandom();

    // ------------------------------------------------------------------ origin state (we as dialer / origin), guarded by L
    static final Object L = new Object();
    static long myInc;
    static long lastAssigned; // highest seq assigned
    static final ArrayList<Item> buffer = new ArrayList<>(); // seq s at index s-1 (no overflow policy needed here)
    static long acked; // cursor of the node
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
    static Long rGoodbye;
    static final ArrayDeque<Long> rOld = new ArrayDeque<>(); // replaced incarnations (last 8)
    static InConn currentIn;
    static final List<InConn> allIn = new ArrayList<>();
    static ServerSocket server;

    static abstract class Conn {
        final Socket s;
        final InputStream in;
        final OutputStream os;
        volatile boolean closed;

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
            return decode(readFrame(deadline));
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
        long sent;
        boolean goodbyeQueued; // taken for writing: nothing may follow it
        boolean goodbyeSent;   // written to the socket: shutdown may close

        OutConn(Socket s) throws IOException { super(s); }
    }

    static final class InConn extends Conn {
        long helloInc;
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
        h.version = 1;
        h.node = ID;
        h.inc = myInc;
        h.nonce = new byte[32];
        RNG.nextBytes(h.nonce);
        synchronized (R) {
            h.hasLast = rKnown;
            if (rKnown) { h.lastInc = rInc; h.lastSeq = rA; }
        }
        h.auth = SECRET != null;
        return h;
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
        if (h.version < 1) return "unsupported protocol version " + h.version + " (this node speaks 1)";
        if (!asciiEqualsIgnoreCase(h.node, NODE))
            return asAcceptor ? "\"" + h.node + "\" is not a configured peer of " + ID
                    : "the node answered as \"" + h.node + "\", not as " + NODE + ", the peer dialed";
        if (h.auth && SECRET == null) return "the peer has a shared secret (cachecast.secret) and this node has none";
        if (!h.auth && SECRET != null) return "this node requires a shared secret (cachecast.secret) and the peer has none";
        return null;
    }

    /** 9.7: returns null when accepted, or the reason of a duplicate identity. */
    static String applyIncarnation(long inc, String via) {
        synchronized (R) {
            if (rKnown && rInc == inc) return null;
            if (rOld.contains(inc))
                return "two running nodes answer as " + NODE + ": incarnation " + u(inc) + " was already replaced";
            if (rKnown) {
                boolean clean = rGoodbye != null && Long.compareUnsigned(rA, rGoodbye) >= 0;
                log("node " + NODE + " new incarnation " + u(inc) + " (was " + u(rInc) + ", a=" + u(rA) + ", goodbye="
                        + (rGoodbye == null ? "none" : u(rGoodbye)) + ") via " + via + (clean ? ": clean restart" : ": flush"));
                if (!clean) out("flush-local new-incarnation");
                rOld.addLast(rInc);
                while (rOld.size() > 8) rOld.removeFirst();
            }
            rKnown = true;
            rInc = inc;
            rA = 0;
            rFresh = true;
            rGoodbye = null;
            return null;
        }
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
        Msg mine = myHello();
        byte[] out = frame(mine);
        if (SECRET != null) {
            Msg a = Msg.of(T_AUTH);
            a.mac = hmac(SECRET, authMessage((byte) 'A', h, mine));
            out = concat(out, frame(a));
        }
        try {
            c.write(out);
        } catch (IOException e) {
            log("inbound handshake: write failed: " + e);
            return false;
        }
        if (SECRET != null) {
            Msg a;
            try {
                a = c.readMsg(deadline);
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
            if (a.type == T_REJECT) {
                error("inbound handshake: node rejected us: " + a.reason);
                return false;
            }
            if (a.type != T_AUTH) {
                error("inbound handshake: expected Auth, got " + name(a.type));
                c.reject("expected Auth, got " + name(a.type));
                return false;
            }
            byte[] expect = hmac(SECRET, authMessage((byte) 'D', h, mine));
            if (!MessageDigest.isEqual(expect, a.mac)) {
                error("inbound handshake: authentication failed for " + h.node + ": wrong shared secret (cachecast.secret differs?)");
                c.reject("authentication failed for " + h.node + ": wrong shared secret (cachecast.secret differs?)");
                return false;
            }
        }
        String dup = applyIncarnation(h.inc, "inbound Hello");
        if (dup != null) {
            error("inbound handshake: " + dup);
            c.reject(dup);
            return false;
        }
        c.helloInc = h.inc;
        InConn old;
        synchronized (R) {
            old = currentIn;
            currentIn = c;
        }
        if (old != null) {
            log("superseding the older inbound connection");
            old.close();
        }
        log("inbound handshake complete: node " + h.node + " incarnation " + u(h.inc) + " (its last_applied "
                + (h.hasLast ? u(h.lastInc) + "/" + u(h.lastSeq) : "none") + ", we said "
                + (mine.hasLast ? u(mine.lastInc) + "/" + u(mine.lastSeq) : "none") + ")");
        out("inbound-up " + u(h.inc));
        Thread w = new Thread(() -> inboundWriter(c), "inbound-writer");
        w.setDaemon(true);
        w.start();
        return true;
    }

    static void inboundReader(InConn c) {
        long lastFrame = System.currentTimeMillis();
        long prevLast = -1; // last seq of the previous Batch on this connection (9.1), -1: none yet
        try {
            while (true) {
                Msg m = c.readMsg(lastFrame + SILENCE_MS);
                lastFrame = System.currentTimeMillis();
                switch (m.type) {
                    case T_BATCH: {
                        if (m.items.isEmpty()) {
                            // 9.1: a sender MUST NOT send an empty Batch; a receiver applies nothing from one.
                            error("node sent an empty Batch (first_seq " + u(m.firstSeq) + "; 9.1 forbids it)");
                        } else {
                            long last = m.firstSeq + m.items.size() - 1;
                            if (prevLast != -1) {
                                if (Long.compareUnsigned(m.firstSeq, prevLast) <= 0)
                                    error("Batch goes backwards on one connection: first_seq " + u(m.firstSeq) + " after " + u(prevLast) + " (9.1)");
                                else if (m.firstSeq != prevLast + 1 && m.items.get(0).kind != I_FLUSH)
                                    log("note: Batch first_seq " + u(m.firstSeq) + " skips after " + u(prevLast) + " without a Flush (9.1)");
                            }
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
                                if (rFresh) rA = m.goodbyeSeq;
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
            for (int i = 0; i < m.items.size(); i++) {
                long s = m.firstSeq + i;
                Item it = m.items.get(i);
                if (Long.compareUnsigned(s, rA) <= 0) continue; // duplicate
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
            }
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
                byte[] data;
                synchronized (c) {
                    while (!c.closed && !c.pongOwed && (c.ackPos == null || Arrays.equals(c.ackPos, c.lastAckWritten))) c.wait();
                    if (c.closed) return;
                    byte[] a = new byte[0], p = new byte[0];
                    if (c.ackPos != null && !Arrays.equals(c.ackPos, c.lastAckWritten)) {
                        Msg ack = Msg.of(T_ACK);
                        ack.ackInc = c.ackPos[0];
                        ack.ackSeq = c.ackPos[1];
                        a = frame(ack);
                        c.lastAckWritten = c.ackPos;
                    }
                    if (c.pongOwed) {
                        p = frame(Msg.of(T_PONG));
                        c.pongOwed = false;
                    }
                    data = concat(a, p);
                }
                c.write(data);
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
                if (c != null) c.close();
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
            Msg d = Msg.of(T_AUTH);
            d.mac = hmac(SECRET, authMessage((byte) 'D', mine, h));
            c.write(frame(d));
        }
        String dup = applyIncarnation(h.inc, "outbound Hello");
        if (dup != null) {
            error("outbound handshake: " + dup);
            c.reject(ID + " refuses: " + dup);
            return false;
        }
        synchronized (L) {
            if (shuttingDown) return false;
            long r = acked;
            if (h.hasLast && h.lastInc == myInc) {
                long l = Long.compareUnsigned(h.lastSeq, lastAssigned) <= 0 ? h.lastSeq : lastAssigned;
                if (Long.compareUnsigned(l, r) > 0) r = l;
            }
            log("outbound handshake complete: node incarnation " + u(h.inc) + ", its last_applied "
                    + (h.hasLast ? u(h.lastInc) + "/" + u(h.lastSeq) : "none") + ", resuming after " + u(r)
                    + " (acked " + u(acked) + ", last " + u(lastAssigned) + ")");
            acked = r;
            c.sent = r;
            dialing = null;
            outbound = c;
            everUp = true;
            out("outbound-up");
            checkTargets();
            L.notifyAll();
        }
        return true;
    }

    /** Under L. */
    static void checkTargets() {
        while (everUp && !targets.isEmpty() && Long.compareUnsigned(targets.peekFirst(), acked) <= 0)
            out("acked " + u(targets.pollFirst()));
    }

    static void runOutbound(OutConn c) {
        Thread r = new Thread(() -> outboundReader(c), "outbound-reader");
        r.setDaemon(true);
        r.start();
        long lastWrite = System.currentTimeMillis();
        try {
            while (true) {
                byte[] data = null;
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
                            ByteArrayOutputStream o = new ByteArrayOutputStream();
                            long s = from + 1;
                            while (Long.compareUnsigned(s, lastAssigned) <= 0 && o.size() < 256 * 1024) {
                                Msg b = Msg.of(T_BATCH);
                                b.firstSeq = s;
                                b.items = new ArrayList<>();
                                long est = 0;
                                while (Long.compareUnsigned(s, lastAssigned) <= 0 && b.items.size() < BATCH && b.items.size() < 4096 && est < 64 * 1024) {
                                    Item it = buffer.get((int) (s - 1));
                                    b.items.add(it);
                                    est += it.kind == I_KEY ? 11 + utf8(it.cache).length + utf8(it.key).length
                                            : it.kind == I_CACHE ? 6 + utf8(it.cache).length : 1;
                                    s++;
                                }
                                byte[] f = frame(b);
                                o.write(f, 0, f.length);
                            }
                            data = o.toByteArray();
                            newSent = s - 1;
                            break;
                        }
                        if (shuttingDown) {
                            if (now < goodbyeDeadline) {
                                Msg g = Msg.of(T_GOODBYE);
                                g.goodbyeSeq = lastAssigned;
                                data = frame(g);
                                isGoodbye = true;
                                log("writing Goodbye{" + u(lastAssigned) + "}");
                                break;
                            }
                            L.wait(1000);
                            continue;
                        }
                        long idle = now - lastWrite;
                        if (idle >= PING_IDLE_MS) { data = frame(Msg.of(T_PING)); break; }
                        L.wait(PING_IDLE_MS - idle);
                    }
                    if (newSent != -1) c.sent = newSent;
                    if (isGoodbye) c.goodbyeQueued = true;
                }
                c.write(data);
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
                            checkTargets();
                            L.notifyAll();
                        }
                    }
                } else if (m.type == T_PONG) {
                    // traffic; nothing else to do
                } else if (m.type == T_REJECT) {
                    error("node sent Reject on the established outbound connection: " + m.reason);
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
            for (long i = 0; i < k; i++) {
                lastAssigned++;
                buffer.add(Item.key("org.hisp.dhis.user.User", "java-" + u(lastAssigned)));
            }
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

    static int selftest(String dir) throws Exception {
        List<Path> files;
        try (Stream<Path> st = Files.list(Paths.get(dir))) {
            files = st.filter(p -> p.toString().endsWith(".hex")).sorted().collect(Collectors.toList());
        }
        check(!files.isEmpty(), "no .hex files in " + dir);
        for (Path f : files) {
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
                default:
                    log("selftest: no expectations for " + name + " (round trip only)");
            }
            log("selftest: " + name + " ok");
        }
        // 12.4
        Msg d = Msg.of(T_HELLO);
        d.node = "10.0.0.2:4001"; d.nonce = fill(0xaa); d.inc = 65536; d.auth = true;
        Msg a = Msg.of(T_HELLO);
        a.node = "10.0.0.1:4001"; a.nonce = fill(0xbb); a.inc = 0x0123456789abcdefL; a.auth = true;
        a.hasLast = true; a.lastInc = 65536; a.lastSeq = 41;
        byte[] key = "0123456789abcdef".getBytes(StandardCharsets.UTF_8);
        byte[] msgA = authMessage((byte) 'A', d, a);
        check(msgA.length == 157, "12.4 message length " + msgA.length);
        check(toHex(hmac(key, msgA)).equals("633202226e67fbc06396669194811d46b2401b31b906f925e79b956f61df139a"), "12.4 mac_A");
        check(toHex(hmac(key, authMessage((byte) 'D', d, a))).equals("1dabd017ebd582fac711255bc4e728a045a14b801e579d10c024fd58b1563e46"), "12.4 mac_D");
        Msg af = Msg.of(T_AUTH);
        af.mac = hmac(key, msgA);
        check(toHex(frame(af)).startsWith("000000210163320222"), "12.4 frame");
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
        expectError("08", "unknown index");
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
        if (ID == null || NODE == null || BATCH < 1) {
            System.err.println("usage: Peer --id HOST:PORT --node HOST:PORT [--send N] [--secret S] [--batch B] | --selftest --vectors DIR");
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
            for (long i = 1; i <= sendN; i++) buffer.add(Item.key("org.hisp.dhis.user.User", "java-" + i));
            lastAssigned = sendN;
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
