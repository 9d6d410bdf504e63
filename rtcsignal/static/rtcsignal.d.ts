// Type declarations for /rtcsignal.js, the browser client of the rtcsignal signaling server.
// Served beside it: `import { SignalingClient } from "https://signal.example.com/rtcsignal.js"`
// (Deno picks these up from the X-TypeScript-Types header; elsewhere, save this file beside
// your code or declare the module with it). Guide: docs/javascript-client.md.

/** Any JSON object with a string `type`; what peers send each other. */
export interface Message {
  type: string;
  /** Set by this client on every message it sends; the server echoes it as `ref`. */
  id?: string;
  /** The sender's peer id, written by the server on every relayed message. */
  from?: string;
  /** The addressee (addressed messages). */
  to?: string;
  /** The room (room messages). */
  room?: string;
  /** The `id` of the message this one answers (see request/reply). */
  ref?: string;
  [field: string]: unknown;
}

/** The server's first message on every connection. */
export interface Greeting extends Message {
  type: "connected";
  message: string;
  clientsCount: number;
  peerId: string;
  /** Single-use token to resume this session after a drop (servers with resume). */
  resumeToken?: string;
  /** True when this connection resumed the previous session (same peer id, rooms, meta). */
  resumed?: boolean;
  /** Messages for this peer that were lost while it was away (on resume). */
  missed?: number;
  iceServers?: RTCIceServer[];
}

/** A member of a room as presence shows it. */
export interface PeerInfo {
  peerId: string;
  meta: Record<string, unknown>;
  /** Perfect negotiation: whether YOU are the polite side toward this peer. */
  polite?: boolean;
}

/** What join() resolves with and the "joined" event carries: the others in the room. */
export interface RoomSnapshot {
  room: string;
  peers: PeerInfo[];
}

export interface BackoffOptions {
  /** First retry delay (default 500 ms), multiplied by `factor` (2) per attempt... */
  initialMs?: number;
  /** ...up to `maxMs` (30 000). */
  maxMs?: number;
  factor?: number;
  /** Fraction of the delay taken off at random (0.5: between half and all of it). */
  jitter?: number;
}

export interface SignalingOptions {
  /** ws://, wss://, http(s):// (changed to ws(s)://) or a path on this page's host.
   * Default "/signaling". */
  url?: string;
  /** A JWT for `--auth jwt` servers, or a function giving one (called on every connect). */
  token?: string | (() => string | Promise<string>);
  /** Join this room at connect time (`?room=`): needed with `--no-default-room`. */
  room?: string;
  /** Reconnect after drops (default true). */
  reconnect?: boolean;
  backoff?: BackoffOptions;
  /** Give up on a connection attempt without a greeting after this long (10 000 ms). */
  connectTimeoutMs?: number;
  /** Application-level ping interval (25 000 ms; 0 turns it off)... */
  keepaliveMs?: number;
  /** ...and how long a pong may take before the socket is given up on (10 000 ms). */
  keepaliveTimeoutMs?: number;
  /** Default timeout of request() (15 000 ms). */
  requestTimeoutMs?: number;
  /** Messages kept while disconnected (500); older ones are dropped as `expired`. */
  maxQueue?: number;
  /** WebSocket constructor to use (default: globalThis.WebSocket at each connect). */
  WebSocket?: { new (url: string): WebSocket };
}

export type ClientState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface OpenEvent {
  peerId: string;
  /** True when the previous session was resumed (same peer id, rooms kept). */
  resumed: boolean;
  missed: number;
  /** The peer id before this connection (differs from peerId when the session was lost). */
  previousPeerId: string | null;
  greeting: Greeting;
}

export interface CloseEvent {
  code: number;
  reason: string;
  willReconnect: boolean;
  /** The delay before the next attempt (null when not reconnecting). */
  delayMs: number | null;
}

export interface PeerJoinedEvent extends PeerInfo {
  type: "peer-joined";
  room: string;
  polite: boolean;
}

export interface PeerLeftEvent {
  type: "peer-left";
  room: string;
  peerId: string;
  /** left | closed | timeout (server); session-lost (this client got a new session). */
  reason: string;
}

export interface ExpiredEvent {
  /** The id of the message that was not delivered. */
  ref: string;
  /** Its addressee, when the server named it. */
  to: string | null;
  /** The message itself, when it is one of the last 256 sent. */
  message: Message | null;
  /** expired (the server said so), session-lost, queue-full (never left this client). */
  reason: string;
}

export interface RawEvent {
  direction: "in" | "out";
  message: Message;
}

export interface SignalingEvents {
  open: OpenEvent;
  close: CloseEvent;
  state: { state: ClientState };
  joined: RoomSnapshot;
  left: { room: string; peers: PeerInfo[] };
  "peer-joined": PeerJoinedEvent;
  "peer-left": PeerLeftEvent;
  /** Relayed messages (with `from`) and server messages without an event of their own. */
  message: Message;
  /** Errors no promise took (errors about send() carry its id as `ref`). */
  error: SignalingError;
  expired: ExpiredEvent;
  /** Every message in and out, for logs. */
  raw: RawEvent;
}

declare class Emitter<Events> {
  /** Listen to `type`; returns a function that stops listening. */
  on<K extends keyof Events>(type: K, listener: (detail: Events[K]) => void): () => void;
  off<K extends keyof Events>(type: K, listener: (detail: Events[K]) => void): void;
  /** The next `type` event (that `filter` accepts). */
  once<K extends keyof Events>(type: K, filter?: (detail: Events[K]) => boolean): Promise<Events[K]>;
}

/** An error from the server (`code` as in docs/protocol.md: unknown-peer, room-full, ...) or
 * from this client (timeout, closed, session-lost, expired, invalid-url, token). */
export declare class SignalingError extends Error {
  constructor(code: string, message?: string, ref?: string, detail?: unknown);
  readonly code: string;
  /** The id of the message this error is about. */
  readonly ref: string | undefined;
  /** The server's error message, if any. */
  readonly detail: unknown;
}

/** The delay before reconnect attempt `attempt` (0-based), jitter included. */
export declare function backoffDelay(attempt: number, backoff?: BackoffOptions): number;

export declare class SignalingClient extends Emitter<SignalingEvents> {
  constructor(options?: SignalingOptions);
  readonly state: ClientState;
  /** This session's peer id (kept across a resume); null before the first greeting. */
  readonly peerId: string | null;
  readonly greeting: Greeting | null;
  /** From the greeting: STUN/TURN servers with time-limited credentials, or []. */
  readonly iceServers: RTCIceServer[];
  /** The current WebSocket, for diagnostics (null between connections). */
  readonly socket: WebSocket | null;
  /** The rooms this client is in or joining. */
  readonly rooms: string[];
  /** The other members of `room`, in join order. */
  peers(room: string): PeerInfo[];
  /** Whether to be polite toward `peerId` (the server's flag in `room`, else a shared rule). */
  polite(peerId: string, room?: string): boolean;
  /** Whether `peerId` is in one of this client's rooms. */
  knows(peerId: string): boolean;

  /** Connect and keep reconnecting; resolves with the first greeting. */
  connect(): Promise<Greeting>;
  /** End the session (close 1000): no reconnect, the server forgets the session. */
  close(code?: number, reason?: string): void;
  /** Drop the current socket and reconnect now, resuming the session. */
  reconnect(): Promise<Greeting>;

  /** Join `room`; resolves with the others already there. */
  join(room: string, meta?: Record<string, unknown>): Promise<RoomSnapshot>;
  leave(room: string): Promise<void>;

  /** Send to one peer; returns the message id. Held while reconnecting. */
  send(to: string, message: Message): string;
  /** Send to the other members of `room`; returns the message id. */
  broadcast(room: string, message: Message): string;
  /** Send as is (no `to`/`room`: the sender's only room); returns the message id. */
  sendRaw(message: Message): string;
  /** Send to `to` and resolve with its reply (the message whose `ref` is this one's id). */
  request(to: string, message: Message, options?: { timeoutMs?: number }): Promise<Message>;
  /** Answer a received `request` message. */
  reply(request: Message, message: Message): string;
  /** Application-level ping; resolves with the round trip in ms. */
  ping(options?: { timeoutMs?: number }): Promise<number>;

  /** One perfectly negotiated RTCPeerConnection per remote peer. */
  calls(options?: CallOptions): CallManager;
}

export interface CallOptions {
  /** Only peers of this room (its `polite` flags decide; calls end when they leave it). */
  room?: string;
  /** The message type carrying this manager's signals (default "rtc"); managers with
   * different types run side by side. */
  type?: string;
  /** RTCPeerConnection configuration (or a function giving one); the greeting's
   * iceServers are used when it has none. */
  configuration?: RTCConfiguration | (() => RTCConfiguration);
  /** Whether to answer a call from `peerId` that this side did not start (default: yes). */
  accept?: (peerId: string, offer: Message) => boolean;
  /** Shorthand for calls.on("call", oncall). */
  oncall?: (call: PeerCall) => void;
}

export interface CallEvents {
  /** A call was created (by call() or by an incoming offer): add tracks, set ontrack. */
  call: PeerCall;
  hangup: PeerCall;
}

export declare class CallManager extends Emitter<CallEvents> implements Iterable<PeerCall> {
  constructor(client: SignalingClient, options?: CallOptions);
  /** The call with `peerId`, created if there is none. */
  call(peerId: string): PeerCall;
  get(peerId: string): PeerCall | undefined;
  readonly size: number;
  [Symbol.iterator](): Iterator<PeerCall>;
  /** End the call with `peerId`, telling the peer unless `bye` is false. */
  hangup(peerId: string, options?: { bye?: boolean }): void;
  /** End every call and stop listening. */
  close(): void;
}

export interface PeerCallEvents {
  state: { connectionState: RTCPeerConnectionState };
  track: RTCTrackEvent;
  close: PeerCall;
  error: unknown;
}

export declare class PeerCall extends Emitter<PeerCallEvents> {
  constructor(client: SignalingClient, peerId: string,
              options?: { polite?: boolean; configuration?: RTCConfiguration; type?: string });
  readonly peerId: string;
  readonly polite: boolean;
  /** This connection's id, sent with its signals; and the remote side's. */
  readonly id: string;
  readonly remoteId: string | null;
  readonly pc: RTCPeerConnection;
  readonly closed: boolean;
  readonly stats: { collisions: number; ignoredOffers: number; rollbacks: number };
  /** Handle a signal from the peer (the manager routes them). */
  handle(signal: Message): Promise<void>;
  /** Roll back an unanswered offer and restart ICE. */
  recover(options?: { onlyIfStuck?: boolean }): Promise<void>;
  close(options?: { bye?: boolean }): void;
}
