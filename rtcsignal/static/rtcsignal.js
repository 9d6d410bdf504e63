// rtcsignal.js: the browser client for the rtcsignal signaling server.
//
// One ES module, no dependencies, no build step: `import { SignalingClient } from
// "/rtcsignal.js"`. Types are in /rtcsignal.d.ts; the guide is docs/javascript-client.md.
//
//   SignalingClient  one WebSocket to the server with automatic reconnect (exponential backoff
//                    with jitter, the server's `reconnect.after_ms`, close 1012/1013), session
//                    resume, rooms with presence, addressed and room messages, request/response
//                    by id/ref, expiry reports and an application-level keepalive.
//   CallManager      one RTCPeerConnection per remote peer, wired with the WebRTC "perfect
//                    negotiation" pattern (the server's `polite` flag decides who yields).
//   PeerCall         one such connection.

const DEFAULTS = Object.freeze({
  url: "/signaling",
  reconnect: true,
  backoff: Object.freeze({ initialMs: 500, maxMs: 30_000, factor: 2, jitter: 0.5 }),
  connectTimeoutMs: 10_000,
  keepaliveMs: 25_000,
  keepaliveTimeoutMs: 10_000,
  requestTimeoutMs: 15_000,
  maxQueue: 500,
});

// Close codes that end the session for good: the server refused by policy (1008) or the
// application said so (4000-4999). Everything else (1001 going away, 1006 dropped, 1011,
// 1012 restart, 1013 try again later, ...) is retried.
const FINAL_CLOSE = (code) => code === 1008 || (code >= 4000 && code <= 4999);
const LOCAL_DROP = 4000; // what this client sends when it gives up on a socket (not a clean end)
const MAX_AFTER_MS = 300_000;
const SENT_MEMORY = 256; // recent message ids kept to say which message an `expired` is about

/** An error reported by the server (`code` as in docs/protocol.md) or by this client
 * (`timeout`, `closed`, `session-lost`, `expired`). */
export class SignalingError extends Error {
  constructor(code, message, ref = undefined, detail = undefined) {
    super(message || code);
    this.name = "SignalingError";
    this.code = code;
    this.ref = ref;
    this.detail = detail;
  }
}

/** The backoff delay before reconnect attempt `attempt` (0-based), jitter included. */
export function backoffDelay(attempt, backoff = DEFAULTS.backoff) {
  const { initialMs, maxMs, factor, jitter } = { ...DEFAULTS.backoff, ...backoff };
  const base = Math.min(maxMs, initialMs * factor ** Math.max(0, attempt));
  return Math.round(base * (1 - Math.min(1, Math.max(0, jitter)) * Math.random()));
}

function randomId(bytes = 9) {
  const a = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(a);
  return btoa(String.fromCharCode(...a)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {}); // a rejection nobody awaits is not an unhandled one
  return { promise, resolve, reject };
}

// Listener errors must not break the client: report them as uncaught, asynchronously.
function report(err) { queueMicrotask(() => { throw err; }); }

class Emitter {
  #handlers = new Map();

  /** Call `fn(detail)` on every `type` event; returns a function that unsubscribes. */
  on(type, fn) {
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    let set = this.#handlers.get(type);
    if (!set) this.#handlers.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) { this.#handlers.get(type)?.delete(fn); }

  /** The next `type` event (optionally the next one `filter` accepts), as a promise. */
  once(type, filter = undefined) {
    return new Promise((resolve) => {
      const off = this.on(type, (detail) => {
        if (filter && !filter(detail)) return;
        off();
        resolve(detail);
      });
    });
  }

  emit(type, detail) {
    const set = this.#handlers.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try { fn(detail); } catch (err) { report(err); }
    }
  }
}

/**
 * One connection to the signaling server, kept up across network drops and server restarts.
 *
 * Events (`client.on(type, fn)`): "open" {peerId, resumed, missed, previousPeerId, greeting},
 * "close" {code, reason, willReconnect, delayMs}, "state" {state}, "joined" {room, peers},
 * "left" {room}, "peer-joined" / "peer-left" (the server's messages), "message" (every
 * relayed message, and server messages without a type of their own), "error" (a
 * SignalingError no promise took), "expired" {ref, to, message}, "raw" {direction, message}.
 */
export class SignalingClient extends Emitter {
  #options;
  #ws = null;
  #state = "idle"; // idle | connecting | open | reconnecting | closed
  #greeted = false; // the current socket got its greeting
  #everOpened = false; // a session exists (a later fresh greeting means it was lost)
  #closing = false;
  #ready = null;
  #peerId = null;
  #greeting = null;
  #resumeToken = null;
  #attempt = 0;
  #reconnectAfter = null;
  #timers = { reconnect: null, connect: null, keepalive: null };
  #seq = 0;
  #prefix = randomId(3);
  #pending = new Map(); // id -> {kind, resolve, reject, timer, to}
  #rooms = new Map(); // name -> {name, meta, peers, joined, cmd, done}
  #joins = new Map(); // join command id -> room name
  #leaving = new Map(); // leave id -> {room, done}
  #outbox = [];
  #sent = new Map(); // id -> message (bounded)
  #onlineListener = null;

  constructor(options = {}) {
    super();
    this.#options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
  }

  /** connecting | open | reconnecting | closed (idle before connect()). */
  get state() { return this.#state; }
  /** This session's peer id (kept across a resume), null before the first greeting. */
  get peerId() { return this.#peerId; }
  /** The last greeting, as the server sent it. */
  get greeting() { return this.#greeting; }
  /** `iceServers` from the greeting (STUN/TURN with time-limited credentials), or []. */
  get iceServers() { return this.#greeting?.iceServers ?? []; }
  /** The current WebSocket (null between connections). For diagnostics; do not send on it. */
  get socket() { return this.#ws; }
  /** The rooms this client is in or joining. */
  get rooms() { return [...this.#rooms.keys()]; }

  /** The members of `room` other than this client, in join order (empty if not joined). */
  peers(room) {
    const r = this.#rooms.get(room);
    return r ? [...r.peers.values()].map((p) => ({ ...p })) : [];
  }

  /** Whether this client should be the polite side toward `peerId` in perfect negotiation:
   * the server's `polite` flag from `room` (or from the rooms shared with that peer when
   * they agree); otherwise a rule both sides compute alike (the smaller peer id is polite). */
  polite(peerId, room = undefined) {
    const flags = new Set();
    for (const [name, r] of this.#rooms) {
      if (room !== undefined && name !== room) continue;
      const p = r.peers.get(peerId);
      if (p && typeof p.polite === "boolean") flags.add(p.polite);
    }
    if (flags.size === 1) return [...flags][0];
    return String(this.#peerId) < String(peerId);
  }

  /** Whether `peerId` is in one of this client's rooms (per the presence seen). */
  knows(peerId) {
    for (const r of this.#rooms.values()) if (r.peers.has(peerId)) return true;
    return false;
  }

  /** Connect (and keep reconnecting). Resolves with the first greeting; rejects only if the
   * client is closed, or the server ends the session for good (close 1008 or 4000-4999),
   * before that. */
  connect() {
    if (this.#state === "idle" || this.#state === "closed") {
      this.#closing = false;
      this.#ready = deferred();
      const room = this.#options.room;
      if (room && !this.#rooms.has(room)) this.#rooms.set(room, this.#room(room, undefined));
      if (typeof globalThis.addEventListener === "function" && !this.#onlineListener) {
        // Back online: retry now instead of at the end of a long backoff.
        this.#onlineListener = () => { if (this.#state === "reconnecting" && !this.#ws) this.#retryNow(); };
        globalThis.addEventListener("online", this.#onlineListener);
      }
      this.#open();
    }
    return this.#ready.promise;
  }

  /** End the session: close 1000 (the server forgets the session), no reconnect. */
  close(code = 1000, reason = "") {
    this.#closing = true;
    const ws = this.#ws;
    if (ws) {
      this.#detach(ws);
      try { ws.close(code, reason); } catch { /* already closed */ }
    }
    this.#finish(code, reason);
  }

  /** Drop the current socket and reconnect at once (resuming the session). For a known
   * network change; also what the keepalive does when pongs stop. */
  reconnect() {
    if (this.#state === "closed" || this.#state === "idle") return this.connect();
    if (this.#ws) this.#lost(LOCAL_DROP, "reconnect requested", true, 0);
    else this.#retryNow();
    return this.#ready.promise;
  }

  /** Join `room` with `meta` (shown to others in presence). Resolves with the snapshot
   * {room, peers: [{peerId, meta, polite}]}; rejects with the server's error (room-full,
   * forbidden, ...). Joining a room already joined or being joined gives the same promise. */
  join(room, meta = undefined) {
    const known = this.#rooms.get(room);
    if (known) return known.done.promise;
    const r = this.#room(room, meta);
    this.#rooms.set(room, r);
    if (this.#state === "open") this.#sendJoin(r);
    return r.done.promise;
  }

  /** Leave `room`. Resolves once the server confirmed (or there was nothing to leave). */
  leave(room) {
    const r = this.#rooms.get(room);
    if (!r) return Promise.resolve();
    this.#rooms.delete(room);
    r.done.reject(new SignalingError("left", `left ${room}`));
    this.emit("left", { room, peers: [...r.peers.values()] });
    const done = deferred();
    if (this.#state !== "open" && !r.joined && !r.cmd) { done.resolve(); return done.promise; }
    const id = this.#nextId();
    this.#leaving.set(id, { room, done });
    if (this.#state === "open") this.#write({ type: "leave", room, id });
    return done.promise;
  }

  /** Send `message` (an object with a string `type`) to the peer `to`. Returns its id. */
  send(to, message) { return this.#post({ ...message, to }); }

  /** Send `message` to the other members of `room`. Returns its id. */
  broadcast(room, message) { return this.#post({ ...message, room }); }

  /** Send `message` as is: without `to` or `room` it goes to the sender's only room (the
   * original server's broadcast to everyone). Returns its id. */
  sendRaw(message) { return this.#post({ ...message }); }

  /** Send `message` to `to` and resolve with that peer's reply (its message whose `ref` is
   * this message's `id`, see reply()). Rejects on the server's error about it, on `expired`,
   * and after `timeoutMs`. */
  request(to, message, { timeoutMs = this.#options.requestTimeoutMs } = {}) {
    const id = message.id ?? this.#nextId();
    const d = deferred();
    this.#track(id, { kind: "request", to, ...d }, timeoutMs);
    this.#post({ ...message, to, id });
    return d.promise;
  }

  /** Answer `request` (a message received with an `id`) with `message`. Returns its id. */
  reply(request, message) {
    if (!request || typeof request.from !== "string") throw new TypeError("reply() needs a received message");
    return this.#post({ ...message, to: request.from, ref: request.id });
  }

  /** Application-level ping: resolves with the round trip in milliseconds. */
  ping({ timeoutMs = this.#options.keepaliveTimeoutMs } = {}) {
    const id = this.#nextId();
    const d = deferred();
    const sentAt = performance.now();
    this.#track(id, { kind: "ping", ...d, resolve: () => d.resolve(performance.now() - sentAt) }, timeoutMs);
    if (!this.#write({ type: "ping", id })) this.#settle(id, new SignalingError("closed", "not connected"));
    return d.promise;
  }

  /** A CallManager: one perfectly negotiated RTCPeerConnection per remote peer. */
  calls(options = {}) { return new CallManager(this, options); }

  // --- connection -------------------------------------------------------------------

  async #open() {
    this.#setState(this.#everOpened ? "reconnecting" : "connecting");
    const o = this.#options;
    const params = {};
    if (o.room) params.room = o.room;
    if (this.#resumeToken) params.resume = this.#resumeToken;
    let token = o.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (err) {
        this.emit("error", new SignalingError("token", `token callback failed: ${err}`, undefined, err));
        return this.#schedule(1006, "token callback failed");
      }
    }
    if (this.#closing || this.#ws) return;
    if (token) params.token = token;
    let url;
    try {
      url = this.#url(params);
    } catch (err) {
      return this.#fail(new SignalingError("invalid-url", String(err)));
    }
    const WS = o.WebSocket ?? globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(url);
    } catch (err) {
      if (err?.name === "SyntaxError") return this.#fail(new SignalingError("invalid-url", String(err)));
      return this.#schedule(1006, String(err));
    }
    this.#ws = ws;
    this.#greeted = false;
    this.#timers.connect = setTimeout(() => {
      if (this.#ws === ws && !this.#greeted) this.#lost(LOCAL_DROP, "connect timeout", true);
    }, o.connectTimeoutMs);
    ws.onmessage = (event) => { if (this.#ws === ws) this.#onFrame(event.data); };
    ws.onclose = (event) => { if (this.#ws === ws) this.#lost(event.code, event.reason, false); };
    ws.onerror = () => {}; // a close event follows
  }

  #url(params) {
    const base = typeof location !== "undefined" ? location.href : undefined;
    const u = new URL(this.#options.url, base);
    if (u.protocol === "http:") u.protocol = "ws:";
    else if (u.protocol === "https:") u.protocol = "wss:";
    for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
    return u.href;
  }

  #detach(ws) {
    ws.onmessage = ws.onclose = ws.onerror = null;
    if (this.#ws === ws) this.#ws = null;
    this.#stopTimers();
  }

  #stopTimers() {
    for (const k of ["connect", "keepalive"]) {
      clearTimeout(this.#timers[k]);
      clearInterval(this.#timers[k]);
      this.#timers[k] = null;
    }
  }

  // The socket is gone (closed by the server, by the network, or given up on here).
  #lost(code, reason, local, delayMs = undefined) {
    const ws = this.#ws;
    if (ws) {
      this.#detach(ws);
      if (local) try { ws.close(LOCAL_DROP, reason); } catch { /* closed */ }
    }
    if (this.#closing) return;
    if (!this.#options.reconnect || (!local && FINAL_CLOSE(code))) {
      return this.#finish(code, reason, new SignalingError("closed", `closed by the server: ${code} ${reason}`));
    }
    this.#schedule(code, reason, delayMs);
  }

  #schedule(code, reason, delayMs = undefined) {
    if (delayMs === undefined) {
      if (this.#reconnectAfter !== null) delayMs = this.#reconnectAfter;
      else delayMs = backoffDelay(code === 1013 ? Math.max(this.#attempt, 3) : this.#attempt, this.#options.backoff);
    }
    this.#reconnectAfter = null;
    this.#attempt += 1;
    this.#setState("reconnecting");
    this.emit("close", { code, reason, willReconnect: true, delayMs });
    clearTimeout(this.#timers.reconnect);
    this.#timers.reconnect = setTimeout(() => { this.#timers.reconnect = null; this.#open(); }, delayMs);
  }

  #retryNow() {
    if (this.#timers.reconnect === null) return;
    clearTimeout(this.#timers.reconnect);
    this.#timers.reconnect = null;
    this.#open();
  }

  #fail(err) {
    this.emit("error", err);
    this.#finish(1006, err.message, err);
  }

  #finish(code, reason, err = undefined) {
    clearTimeout(this.#timers.reconnect);
    this.#timers.reconnect = null;
    this.#stopTimers();
    const closed = err ?? new SignalingError("closed", "the client was closed");
    for (const id of [...this.#pending.keys()]) this.#settle(id, closed);
    for (const [id, l] of this.#leaving) { this.#leaving.delete(id); l.done.resolve(); }
    for (const r of this.#rooms.values()) r.done.reject(closed);
    this.#rooms.clear();
    this.#joins.clear();
    this.#outbox = [];
    this.#resumeToken = null;
    this.#everOpened = false;
    this.#ready?.reject(closed);
    if (this.#onlineListener) {
      globalThis.removeEventListener("online", this.#onlineListener);
      this.#onlineListener = null;
    }
    const was = this.#state;
    this.#setState("closed");
    if (was !== "closed") this.emit("close", { code, reason, willReconnect: false, delayMs: null });
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.emit("state", { state });
  }

  // --- sending ----------------------------------------------------------------------

  #nextId() { return `${this.#prefix}${++this.#seq}`; }

  // A message for other peers: gets an id, is remembered for `expired`, and waits in the
  // outbox while the client is between connections.
  #post(message) {
    if (!message || typeof message.type !== "string") throw new TypeError("a message needs a string type");
    if (message.id === undefined) message.id = this.#nextId();
    this.#sent.set(message.id, message);
    if (this.#sent.size > SENT_MEMORY) this.#sent.delete(this.#sent.keys().next().value);
    if (!this.#write(message)) {
      this.#outbox.push(message);
      if (this.#outbox.length > this.#options.maxQueue) this.#expire(this.#outbox.shift(), "queue-full");
    }
    return message.id;
  }

  #write(message) {
    const ws = this.#ws;
    if (!ws || !this.#greeted || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(message));
    this.emit("raw", { direction: "out", message });
    return true;
  }

  #expire(message, reason) {
    this.#settle(message.id, new SignalingError("expired", `not delivered (${reason})`, message.id));
    this.emit("expired", { ref: message.id, to: message.to ?? null, message, reason });
  }

  #track(id, entry, timeoutMs) {
    if (timeoutMs > 0) {
      entry.timer = setTimeout(() => this.#settle(id, new SignalingError("timeout", "no answer in time", id)), timeoutMs);
    }
    this.#pending.set(id, entry);
  }

  // Resolve (value) or reject (SignalingError) the pending entry `id`; false if there is none.
  #settle(id, value) {
    const p = this.#pending.get(id);
    if (!p) return false;
    this.#pending.delete(id);
    clearTimeout(p.timer);
    if (value instanceof Error) p.reject(value);
    else p.resolve(value);
    return true;
  }

  #room(name, meta) {
    return { name, meta, peers: new Map(), joined: false, cmd: null, done: deferred() };
  }

  #sendJoin(r) {
    r.cmd = this.#nextId();
    this.#joins.set(r.cmd, r.name);
    const msg = { type: "join", room: r.name, id: r.cmd };
    if (r.meta !== undefined) msg.meta = r.meta;
    this.#write(msg);
  }

  #startKeepalive() {
    const every = this.#options.keepaliveMs;
    if (!(every > 0)) return;
    const ws = this.#ws;
    this.#timers.keepalive = setInterval(() => {
      this.ping().catch((err) => {
        if (err.code === "timeout" && this.#ws === ws) this.#lost(LOCAL_DROP, "keepalive timeout", true, 0);
      });
    }, every);
  }

  // --- receiving --------------------------------------------------------------------

  #onFrame(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return this.emit("error", new SignalingError("invalid-json", "the server sent text that is not JSON"));
    }
    if (!msg || typeof msg !== "object" || Array.isArray(msg)) return;
    this.emit("raw", { direction: "in", message: msg });
    if (typeof msg.from === "string") {
      // A relayed message: an answer to request() is taken by it, the rest is an event.
      const p = msg.ref !== undefined ? this.#pending.get(msg.ref) : undefined;
      if (p && p.kind === "request" && p.to === msg.from) this.#settle(msg.ref, msg);
      else this.emit("message", msg);
      return;
    }
    switch (msg.type) {
      case "connected": return this.#onGreeting(msg);
      case "joined": return this.#onJoined(msg);
      case "peer-joined": return this.#onPeerJoined(msg);
      case "peer-left": return this.#onPeerLeft(msg);
      case "left": return this.#onLeft(msg);
      case "pong": if (msg.ref !== undefined) this.#settle(msg.ref, msg); return;
      case "error": return this.#onError(msg);
      case "expired": return this.#onExpired(msg);
      case "reconnect": {
        const after = Number(msg.after_ms);
        this.#reconnectAfter = Number.isFinite(after) ? Math.min(MAX_AFTER_MS, Math.max(0, after)) : null;
        return;
      }
      default: this.emit("message", msg);
    }
  }

  #onGreeting(msg) {
    clearTimeout(this.#timers.connect);
    const previousPeerId = this.#peerId;
    const lostSession = this.#everOpened && msg.resumed !== true;
    const resumed = this.#everOpened && !lostSession;
    this.#greeted = true;
    this.#everOpened = true;
    this.#attempt = 0;
    this.#greeting = msg;
    this.#peerId = msg.peerId ?? null;
    this.#resumeToken = typeof msg.resumeToken === "string" ? msg.resumeToken : null;
    this.#setState("open");
    this.#startKeepalive();
    if (lostSession) this.#dropSession();
    for (const r of this.#rooms.values()) {
      if (resumed && r.joined) continue;
      // The server joins the ?room= one itself; the others are joined here (a join sent
      // before a drop may not have reached the server: sent again, see #onError).
      if (!(r.name === this.#options.room && !resumed)) this.#sendJoin(r);
    }
    for (const [id, l] of this.#leaving) this.#write({ type: "leave", room: l.room, id });
    const outbox = this.#outbox;
    this.#outbox = [];
    for (const m of outbox) if (!this.#write(m)) this.#outbox.push(m);
    this.emit("open", {
      peerId: this.#peerId, resumed, missed: Number(msg.missed) || 0, previousPeerId, greeting: msg,
    });
    this.#ready.resolve(msg);
  }

  // A new session replaced the lost one: this client is a new peer to everyone. Presence is
  // emptied (with peer-left events, so calls to those peers end), requests and queued
  // messages of the old session fail, and rooms are joined again.
  #dropSession() {
    const lost = new SignalingError("session-lost", "the session could not be resumed");
    for (const [id, p] of [...this.#pending]) if (p.kind !== "ping") this.#settle(id, lost);
    for (const [id, l] of this.#leaving) { this.#leaving.delete(id); l.done.resolve(); }
    const outbox = this.#outbox;
    this.#outbox = [];
    for (const m of outbox) this.#expire(m, "session-lost");
    this.#joins.clear();
    for (const r of this.#rooms.values()) {
      const peers = [...r.peers.values()];
      r.peers.clear();
      r.joined = false;
      r.cmd = null;
      for (const p of peers) this.emit("peer-left", { type: "peer-left", room: r.name, peerId: p.peerId, reason: "session-lost" });
    }
  }

  #onJoined(msg) {
    const r = this.#rooms.get(msg.room);
    if (msg.ref !== undefined) this.#joins.delete(msg.ref);
    if (!r) return; // joined, then left before the answer came
    r.joined = true;
    r.cmd = null;
    r.peers = new Map();
    for (const p of Array.isArray(msg.peers) ? msg.peers : []) {
      if (p && typeof p.peerId === "string") r.peers.set(p.peerId, { peerId: p.peerId, meta: p.meta ?? {}, polite: p.polite });
    }
    const snapshot = { room: r.name, peers: this.peers(r.name) };
    this.emit("joined", snapshot);
    r.done.resolve(snapshot);
  }

  #onPeerJoined(msg) {
    const r = this.#rooms.get(msg.room);
    if (r && typeof msg.peerId === "string") r.peers.set(msg.peerId, { peerId: msg.peerId, meta: msg.meta ?? {}, polite: msg.polite });
    this.emit("peer-joined", msg);
  }

  #onPeerLeft(msg) {
    const r = this.#rooms.get(msg.room);
    if (r && !r.peers.delete(msg.peerId)) return; // already reported
    this.emit("peer-left", msg);
  }

  #onLeft(msg) {
    const l = msg.ref !== undefined ? this.#leaving.get(msg.ref) : undefined;
    if (l) { this.#leaving.delete(msg.ref); l.done.resolve(); }
  }

  #onError(msg) {
    const err = new SignalingError(String(msg.code ?? "error"), String(msg.message ?? msg.code ?? "error"), msg.ref, msg);
    if (msg.ref !== undefined && this.#joins.has(msg.ref)) {
      const r = this.#rooms.get(this.#joins.get(msg.ref));
      this.#joins.delete(msg.ref);
      if (!r || r.joined) return; // left meanwhile, or a join sent twice around a drop
      if (r.cmd === msg.ref) r.cmd = null;
      if (msg.code === "already-in-room") {
        // A join sent before a drop reached the server, but its answer was lost: join again
        // to get the snapshot.
        this.#write({ type: "leave", room: r.name, id: this.#nextId() });
        this.#sendJoin(r);
        return;
      }
      this.#rooms.delete(r.name);
      r.done.reject(err);
      return;
    }
    if (msg.ref !== undefined) {
      const l = this.#leaving.get(msg.ref);
      if (l) { this.#leaving.delete(msg.ref); l.done.resolve(); return; }
      if (this.#settle(msg.ref, err)) return;
    }
    this.emit("error", err);
  }

  #onExpired(msg) {
    const message = this.#sent.get(msg.ref) ?? null;
    this.#settle(msg.ref, new SignalingError("expired", "not delivered", msg.ref, msg));
    this.emit("expired", { ref: msg.ref, to: msg.to ?? null, message, reason: "expired" });
  }
}

/**
 * One RTCPeerConnection per remote peer, negotiated with the "perfect negotiation" pattern
 * of the WebRTC specification: either side may add or remove tracks at any time; when both
 * send an offer at once, the polite side rolls its own back and answers, the impolite side
 * ignores the offer it received.
 *
 * Events: "call" (a PeerCall was created: add tracks, set ontrack), "hangup" (a call ended).
 */
export class CallManager extends Emitter {
  #client;
  #options;
  #calls = new Map();
  #offs = [];

  constructor(client, options = {}) {
    super();
    this.#client = client;
    this.#options = { type: "rtc", accept: () => true, ...options };
    if (typeof this.#options.oncall === "function") this.on("call", this.#options.oncall);
    const room = this.#options.room;
    const type = this.#options.type;
    this.#offs.push(
      client.on("message", (msg) => {
        if (msg.type !== type || typeof msg.from !== "string") return;
        if (room !== undefined && !client.peers(room).some((p) => p.peerId === msg.from)) return;
        this.#route(msg);
      }),
      client.on("peer-left", (ev) => {
        if (room !== undefined ? ev.room === room : !client.knows(ev.peerId)) this.hangup(ev.peerId, { bye: false });
      }),
      client.on("left", (ev) => {
        for (const peerId of [...this.#calls.keys()]) {
          if (room !== undefined ? ev.room === room : !client.knows(peerId)) this.hangup(peerId, { bye: false });
        }
      }),
      client.on("open", (ev) => {
        // Signals sent just before a drop may be lost: calls left mid-negotiation start over.
        if (ev.resumed) for (const call of this.#calls.values()) call.recover({ onlyIfStuck: true });
      }),
      client.on("expired", (ev) => {
        if (ev.message?.type === type && ev.to) this.#calls.get(ev.to)?.recover();
      }),
      client.on("close", (ev) => { if (!ev.willReconnect) this.close(); }),
    );
  }

  /** The call with `peerId`, made if there is none (calls it "call" listeners first). */
  call(peerId) {
    let call = this.#calls.get(peerId);
    if (!call) {
      call = new PeerCall(this.#client, peerId, {
        polite: this.#client.polite(peerId, this.#options.room),
        configuration: this.#configuration(),
        type: this.#options.type,
      });
      this.#calls.set(peerId, call);
      call.on("close", () => {
        if (this.#calls.get(peerId) === call) this.#calls.delete(peerId);
        this.emit("hangup", call);
      });
      this.emit("call", call);
    }
    return call;
  }

  get(peerId) { return this.#calls.get(peerId); }
  get size() { return this.#calls.size; }
  [Symbol.iterator]() { return this.#calls.values(); }

  /** End the call with `peerId`; the peer is told (a "bye") unless `bye` is false. */
  hangup(peerId, { bye = true } = {}) { this.#calls.get(peerId)?.close({ bye }); }

  /** End every call and stop listening to the client. */
  close() {
    for (const off of this.#offs.splice(0)) off();
    for (const call of [...this.#calls.values()]) call.close({ bye: this.#client.state === "open" });
  }

  #configuration() {
    const given = this.#options.configuration;
    const conf = typeof given === "function" ? given() : { ...given };
    if (!conf.iceServers && this.#client.iceServers.length) conf.iceServers = this.#client.iceServers;
    return conf;
  }

  #route(msg) {
    let call = this.#calls.get(msg.from);
    if (call && msg.call && call.remoteId && call.remoteId !== msg.call) {
      // The peer started over with a new connection (it reloaded its call): so do we.
      if (msg.bye) return;
      call.close({ bye: false });
      call = undefined;
    }
    if (!call) {
      if (msg.bye || !msg.description || msg.description.type !== "offer") return;
      if (!this.#options.accept(msg.from, msg)) return;
      call = this.call(msg.from);
    }
    call.handle(msg);
  }
}

/** One perfectly negotiated RTCPeerConnection with one remote peer (see CallManager).
 * Events: "state" {connectionState}, "track" (the RTCTrackEvent), "close", "error". */
export class PeerCall extends Emitter {
  #client;
  #type;
  #chain = Promise.resolve();
  #makingOffer = false;
  #ignoreOffer = false;
  #settingRemoteAnswer = false;
  #closed = false;

  constructor(client, peerId, { polite, configuration = {}, type = "rtc" } = {}) {
    super();
    this.#client = client;
    this.#type = type;
    /** The remote peer's id. */
    this.peerId = peerId;
    /** Whether this side yields when offers collide. */
    this.polite = Boolean(polite);
    /** This connection's id (sent with every signal), and the remote one's once known. */
    this.id = randomId();
    this.remoteId = null;
    /** Offer collisions seen; offers ignored (impolite side); own offers rolled back (polite). */
    this.stats = { collisions: 0, ignoredOffers: 0, rollbacks: 0 };
    const pc = (this.pc = new RTCPeerConnection(configuration));
    pc.onnegotiationneeded = async () => {
      try {
        this.#makingOffer = true;
        await pc.setLocalDescription();
        this.#signal({ description: pc.localDescription });
      } catch (err) {
        this.#error(err);
      } finally {
        this.#makingOffer = false;
      }
    };
    pc.onicecandidate = ({ candidate }) => { if (candidate) this.#signal({ candidate }); };
    pc.oniceconnectionstatechange = () => { if (pc.iceConnectionState === "failed") pc.restartIce(); };
    pc.onconnectionstatechange = () => this.emit("state", { connectionState: pc.connectionState });
    pc.ontrack = (event) => this.emit("track", event);
  }

  get closed() { return this.#closed; }

  /** Handle a signal from the remote peer ({description} or {candidate} or {bye}). */
  handle(msg) {
    if (msg.call) this.remoteId ??= msg.call;
    this.#chain = this.#chain.then(() => this.#handle(msg)).catch((err) => this.#error(err));
    return this.#chain;
  }

  async #handle({ description, candidate, bye }) {
    if (this.#closed) return;
    const pc = this.pc;
    if (bye) return this.close({ bye: false });
    if (description) {
      const readyForOffer = !this.#makingOffer && (pc.signalingState === "stable" || this.#settingRemoteAnswer);
      const collision = description.type === "offer" && !readyForOffer;
      if (collision) this.stats.collisions += 1;
      this.#ignoreOffer = !this.polite && collision;
      if (this.#ignoreOffer) {
        this.stats.ignoredOffers += 1;
        return;
      }
      if (collision) this.stats.rollbacks += 1; // setRemoteDescription rolls our offer back
      this.#settingRemoteAnswer = description.type === "answer";
      try {
        await pc.setRemoteDescription(description);
      } finally {
        this.#settingRemoteAnswer = false;
      }
      if (description.type === "offer") {
        await pc.setLocalDescription();
        this.#signal({ description: pc.localDescription });
      }
    } else if (candidate) {
      try {
        await pc.addIceCandidate(candidate);
      } catch (err) {
        if (!this.#ignoreOffer) throw err; // candidates of an offer we ignored fail: fine
      }
    }
  }

  /** Start negotiating again: roll back an offer that got no answer, restart ICE. Called by
   * the manager after a resume and when a signal of this call expired. */
  async recover({ onlyIfStuck = false } = {}) {
    const pc = this.pc;
    if (this.#closed) return;
    const stuck = pc.signalingState !== "stable" || !["connected", "new"].includes(pc.connectionState);
    if (onlyIfStuck && !stuck) return;
    try {
      if (pc.signalingState === "have-local-offer") await pc.setLocalDescription({ type: "rollback" });
      pc.restartIce();
    } catch (err) {
      this.#error(err);
    }
  }

  /** Close the connection; tell the peer unless `bye` is false. */
  close({ bye = true } = {}) {
    if (this.#closed) return;
    this.#closed = true;
    if (bye) {
      try { this.#client.send(this.peerId, { type: this.#type, call: this.id, bye: true }); } catch { /* closed */ }
    }
    this.pc.close();
    this.emit("state", { connectionState: "closed" });
    this.emit("close", this);
  }

  #signal(payload) {
    if (this.#closed) return;
    this.#client.send(this.peerId, { type: this.#type, call: this.id, ...JSON.parse(JSON.stringify(payload)) });
  }

  #error(err) {
    if (this.#closed) return;
    this.emit("error", err);
  }
}
