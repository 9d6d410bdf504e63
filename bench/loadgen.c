/* loadgen.c - epoll WebSocket client load generator for the rtcsignal benchmarks.
 *
 * One thread, one epoll set, many client connections. Per received frame it does a header
 * decode and (for benchmark payloads only) a memmem for the "ts" stamp, so it costs far less
 * per delivery than any server under test; every mode reports its own CPU use ("lg_cpu_pct")
 * so a run where the generator itself was saturated can be spotted and discarded.
 *
 *   loadgen --port P --mode fanout  --n 100 --payload ice.json [--window W] [--duration s]
 *   loadgen --port P --mode latency --n 100 --payload ice.json [--rate 20]
 *   loadgen --port P --mode rooms   --n 1000 --payload ice.json [--window W]
 *   loadgen --port P --mode storm   --n 5000 [--conc 64]
 *   loadgen --port P --mode idle    --levels 1000,5000,10000   (one JSON line per level,
 *                                    then waits for a line on stdin: "n" next level, "q" quit)
 * --sources K binds client i to 127.100.0.1 + (i % K): each client its own address, as real
 * peers are (servers with per-address limits would otherwise refuse the 65th client).
 * Prints one JSON object per line on stdout; the last line is the result.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { S_TCP, S_UPGRADE, S_OPEN, S_DEAD };
#define RBUF (1 << 20)
#define RING (1 << 16)

typedef struct Conn {
  int fd, idx, st, greeted, wantout;
  char *left; size_t nleft, capleft;   /* bytes of an incomplete frame kept between reads */
  char *out; size_t outoff, outlen, outcap;
  uint64_t got;                        /* benchmark payloads received */
  char peer[64];                       /* peerId announced in the greeting (rtcsignal) */
  char *msg; size_t msglen, tsoff;     /* rooms: prebuilt masked frame addressed to the partner */
} Conn;

/* options */
static const char *o_host = "127.0.0.1", *o_path = "/signaling", *o_mode = "fanout";
static const char *o_payload, *o_levels = "1000", *o_room_prefix = "r";
static int o_port = 8083, o_n = 10, o_conc = 64, o_window = 0, o_sources = 0;
static double o_dur = 5, o_warm = 1, o_rate = 20, o_timeout = 120;

static int ep;
static char *rbuf;
static Conn **cs; static int ncs;
static int n_open, n_greeted, n_failed, n_closed;
static uint64_t n_pings, deliveries;
static char *pl; static size_t pllen; static long pl_ts = -1;  /* payload file and offset of its stamp */
/* fanout pacing: ring[k % RING] counts receivers that got message k */
static uint32_t *ring; static uint64_t sent, done_msgs; static int n_recv;
/* latency samples (ns) */
static int64_t *lat; static size_t nlat, latcap; static int sampling;
/* rooms */
static int npairs, next_pair; static unsigned char *pair_dir;

static int64_t now_ns(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}
static double now_s(void) { return now_ns() / 1e9; }
static double cpu_s(void) {
  struct rusage u; getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static void die_json(const char *why) {
  printf("{\"mode\":\"%s\",\"error\":\"%s\",\"greeted\":%d,\"failed\":%d,\"closed\":%d}\n",
         o_mode, why, n_greeted, n_failed, n_closed);
  exit(1);
}

static void set_events(Conn *c, int wantout) {
  if (c->wantout == wantout) return;
  c->wantout = wantout;
  struct epoll_event e = {.events = EPOLLIN | (wantout ? EPOLLOUT : 0), .data.ptr = c};
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void kill_conn(Conn *c, int failed) {
  if (c->st == S_DEAD) return;
  if (c->st == S_OPEN) n_open--;
  if (failed) n_failed++;
  c->st = S_DEAD; n_closed++;
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
}

static void queue(Conn *c, const void *p, size_t n) {
  if (c->outoff == c->outlen) c->outoff = c->outlen = 0;
  if (c->outlen + n > c->outcap) {
    memmove(c->out, c->out + c->outoff, c->outlen - c->outoff);
    c->outlen -= c->outoff; c->outoff = 0;
    if (c->outlen + n > c->outcap) {
      c->outcap = 2 * (c->outlen + n);
      c->out = realloc(c->out, c->outcap);
    }
  }
  memcpy(c->out + c->outlen, p, n); c->outlen += n;
}

static void flush_out(Conn *c) {
  while (c->outoff < c->outlen) {
    ssize_t k = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      kill_conn(c, 1); return;
    }
    c->outoff += k;
  }
  set_events(c, c->outoff < c->outlen);
}

/* Client frames are masked; we use the all-zero key (legal, RFC 6455 5.3) so the payload
 * bytes can be prebuilt once and stamped in place. */
static size_t frame_hdr(unsigned char *h, int op, size_t n) {
  size_t k = 0;
  h[k++] = 0x80 | op;
  if (n < 126) h[k++] = 0x80 | n;
  else if (n < 65536) { h[k++] = 0x80 | 126; h[k++] = n >> 8; h[k++] = n; }
  else { h[k++] = 0x80 | 127; for (int i = 7; i >= 0; i--) h[k++] = n >> (8 * i); }
  memset(h + k, 0, 4);
  return k + 4;
}
static char *build_frame(const char *p, size_t n, size_t *flen) {
  unsigned char h[16]; size_t hl = frame_hdr(h, 1, n);
  char *f = malloc(hl + n);
  memcpy(f, h, hl); memcpy(f + hl, p, n);
  *flen = hl + n;
  return f;
}
static void send_ctl(Conn *c, int op, const char *p, size_t n) {
  unsigned char h[16]; size_t hl = frame_hdr(h, op, n);
  queue(c, h, hl); queue(c, p, n); flush_out(c);
}
static void stamp(char *digits) {
  int64_t t = now_ns();
  for (int i = 18; i >= 0; i--) { digits[i] = '0' + t % 10; t /= 10; }
}

static Conn *dial(int idx) {
  Conn *c = calloc(1, sizeof *c);
  c->idx = idx; cs[idx] = c; if (idx >= ncs) ncs = idx + 1;
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (c->fd < 0) die_json("socket (RLIMIT_NOFILE?)");
  int one = 1; setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (o_sources > 0) { /* one loopback source address per client, as distinct peers would have */
    struct sockaddr_in s = {.sin_family = AF_INET};
    s.sin_addr.s_addr = htonl((127u << 24 | 100u << 16) + 1 + idx % o_sources);
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(c->fd, (struct sockaddr *)&s, sizeof s)) die_json("bind source address");
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(o_port)};
  inet_pton(AF_INET, o_host, &a.sin_addr);
  c->st = S_TCP; c->wantout = 1;
  if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
    close(c->fd); c->st = S_DEAD; n_failed++; n_closed++; return c;
  }
  struct epoll_event e = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
  epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
  return c;
}

static void send_upgrade(Conn *c) {
  char req[600], path[300];
  if (!strcmp(o_mode, "rooms")) snprintf(path, sizeof path, "%s?room=%s%d", o_path, o_room_prefix, c->idx / 2);
  else snprintf(path, sizeof path, "%s", o_path);
  int n = snprintf(req, sizeof req,
                   "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: YmVuY2gtbG9hZGdlbi0xMg==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                   path, o_host, o_port);
  c->st = S_UPGRADE;
  queue(c, req, n); flush_out(c);
}

static void rooms_send(int pair) {
  int dir = pair_dir[pair]; pair_dir[pair] ^= 1;
  Conn *from = cs[2 * pair + dir];
  if (from->st != S_OPEN) return;
  stamp(from->msg + from->tsoff);
  queue(from, from->msg, from->msglen); sent++;
  flush_out(from);
}

/* a benchmark payload (it carries "ts":"<19 digits>") arrived at c */
static void on_payload(Conn *c, const char *ts) {
  int64_t t = now_ns(), v = 0;
  for (int i = 0; i < 19; i++) v = v * 10 + (ts[i] - '0');
  deliveries++;
  if (sampling && nlat < latcap) lat[nlat++] = t - v;
  if (ring) {
    uint64_t k = c->got;
    ring[k % RING]++;
    while (done_msgs < sent && ring[done_msgs % RING] == (uint32_t)n_recv) ring[done_msgs++ % RING] = 0;
  }
  c->got++;
  if (pair_dir) { rooms_send(next_pair); next_pair = (next_pair + 1) % npairs; }
}

static void on_text(Conn *c, const char *p, size_t n) {
  if (!c->greeted) {
    if (!memmem(p, n, "\"connected\"", 11)) return;
    c->greeted = 1; n_greeted++;
    const char *q = memmem(p, n, "\"peerId\":\"", 10);
    if (q) {
      q += 10; size_t k = 0;
      while (q + k < p + n && q[k] != '"' && k < sizeof c->peer - 1) { c->peer[k] = q[k]; k++; }
      c->peer[k] = 0;
    }
    return;
  }
  const char *ts = memmem(p, n < 600 ? n : 600, "\"ts\":\"", 6);
  if (ts && (size_t)(ts - p) + 6 + 19 <= n) on_payload(c, ts + 6);
}

/* parse whole frames in buf[0..n); return bytes consumed */
static size_t parse_frames(Conn *c, char *buf, size_t n) {
  size_t off = 0;
  while (n - off >= 2 && c->st == S_OPEN) {
    unsigned char *h = (unsigned char *)buf + off;
    uint64_t len = h[1] & 0x7f; size_t hl = 2;
    if (len == 126) { if (n - off < 4) break; len = (h[2] << 8) | h[3]; hl = 4; }
    else if (len == 127) {
      if (n - off < 10) break;
      len = 0; for (int i = 2; i < 10; i++) len = (len << 8) | h[i];
      hl = 10;
    }
    int masked = h[1] & 0x80; if (masked) hl += 4;
    if (n - off < hl + len) break;
    char *p = (char *)h + hl;
    if (masked) for (uint64_t i = 0; i < len; i++) p[i] ^= h[hl - 4 + (i & 3)];
    int op = h[0] & 0x0f;
    if (op == 1 || op == 2) on_text(c, p, len);
    else if (op == 9) { n_pings++; send_ctl(c, 10, p, len); }
    else if (op == 8) { send_ctl(c, 8, p, len < 2 ? len : 2); kill_conn(c, 0); }
    off += hl + len;
  }
  return off;
}

static void on_readable(Conn *c) {
  size_t have = c->nleft;
  if (have > RBUF / 2) { /* a frame larger than the shared buffer: read into the conn's own */
    if (c->capleft < have + RBUF) { c->capleft = have + RBUF; c->left = realloc(c->left, c->capleft); }
    ssize_t k = recv(c->fd, c->left + have, c->capleft - have, 0);
    if (k == 0 || (k < 0 && errno != EAGAIN)) { kill_conn(c, c->st != S_OPEN); return; }
    if (k < 0) return;
    c->nleft += k;
    size_t used = parse_frames(c, c->left, c->nleft);
    memmove(c->left, c->left + used, c->nleft - used); c->nleft -= used;
    return;
  }
  memcpy(rbuf, c->left, have);
  ssize_t k = recv(c->fd, rbuf + have, RBUF - have, 0);
  if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) { kill_conn(c, c->st != S_OPEN); return; }
  if (k < 0) return;
  size_t n = have + k, off = 0;
  if (c->st == S_UPGRADE) {
    char *e = memmem(rbuf, n, "\r\n\r\n", 4);
    if (!e) { off = 0; goto keep; }
    if (n < 12 || memcmp(rbuf + 9, "101", 3)) { kill_conn(c, 1); return; }
    off = e + 4 - rbuf; c->st = S_OPEN; n_open++;
  }
  off += parse_frames(c, rbuf + off, n - off);
keep:
  if (c->st == S_DEAD) return;
  if (n - off > c->capleft) { c->capleft = 2 * (n - off); c->left = realloc(c->left, c->capleft); }
  memcpy(c->left, rbuf + off, n - off); c->nleft = n - off;
}

static void on_event(Conn *c, uint32_t ev) {
  if (c->st == S_TCP) {
    int err = 0; socklen_t l = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err || (ev & (EPOLLERR | EPOLLHUP))) { kill_conn(c, 1); return; }
    if (ev & EPOLLOUT) send_upgrade(c);
    return;
  }
  if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
  if (c->st != S_DEAD && (ev & EPOLLOUT)) flush_out(c);
}

#define STDIN_TAG ((void *)1)
static int stdin_line;
static void poll_ms(int ms) {
  struct epoll_event ev[256];
  int k = epoll_wait(ep, ev, 256, ms);
  for (int i = 0; i < k; i++) {
    if (ev[i].data.ptr == STDIN_TAG) { stdin_line = 1; continue; }
    on_event(ev[i].data.ptr, ev[i].events);
  }
}

/* open connections [ncs, upto) with at most o_conc not yet greeted; wait until all are greeted */
static int open_until(int upto, double deadline) {
  int want = n_greeted + (upto - ncs);
  while (now_s() < deadline) {
    while (ncs < upto && ncs - n_greeted - n_failed < o_conc) dial(ncs);
    if (n_greeted >= want) return 1;
    if (ncs >= upto && n_greeted + n_failed >= want) return 0;
    poll_ms(5);
  }
  return 0;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}
static void print_lat(void) {
  qsort(lat, nlat, sizeof *lat, cmp_i64);
#define Q(q) (nlat ? lat[(size_t)((q) * (nlat - 1))] / 1e6 : -1.0)
  double sum = 0; for (size_t i = 0; i < nlat; i++) sum += lat[i];
  printf("\"samples\":%zu,\"lat_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f},",
         nlat, Q(0.5), Q(0.9), Q(0.99), nlat ? lat[nlat - 1] / 1e6 : -1.0, nlat ? sum / nlat / 1e6 : -1.0);
}
static void print_tail(double lg_cpu_pct) {
  printf("\"lg_cpu_pct\":%.1f,\"open\":%d,\"failed\":%d,\"closed\":%d,\"pings_answered\":%llu}\n",
         lg_cpu_pct, n_open, n_failed, n_closed, (unsigned long long)n_pings);
  fflush(stdout);
}

static void load_payload(void) {
  if (!o_payload) die_json("--payload needed");
  FILE *f = fopen(o_payload, "rb");
  if (!f) die_json("cannot open payload");
  fseek(f, 0, SEEK_END); pllen = ftell(f); rewind(f);
  pl = malloc(pllen + 1);
  if (fread(pl, 1, pllen, f) != pllen) die_json("read payload");
  fclose(f);
  while (pllen && (pl[pllen - 1] == '\n' || pl[pllen - 1] == ' ')) pllen--;
  char *t = memmem(pl, pllen, "\"ts\":\"", 6);
  if (!t || t + 6 + 19 > pl + pllen || t - pl > 400) die_json("payload needs \\\"ts\\\":\\\"<19 digits>\\\" near its start");
  pl_ts = t + 6 - pl;
}

/* fanout / latency / rooms: connect, warm up, measure, print */
static int run_traffic(int mode) { /* 0 fanout, 1 latency, 2 rooms */
  load_payload();
  int total = mode == 0 ? o_n + 1 : o_n;
  if (mode == 2 && (o_n < 2 || o_n % 2)) die_json("rooms needs an even --n");
  n_recv = mode == 0 ? o_n : o_n - 1;
  double t0 = now_s();
  if (!open_until(total, t0 + o_timeout)) die_json("connect");
  double connect_s = now_s() - t0;
  size_t flen; char *frame = build_frame(pl, pllen, &flen);
  size_t ts_at = flen - pllen + pl_ts;
  Conn *snd = cs[total - 1];
  if (mode == 0) {
    ring = calloc(RING, sizeof *ring);
    /* default window: ~256 KiB of undelivered payload per receiver, whatever N is: enough to keep
     * a server that coalesces writes busy, bounded so the buffers stay far below the servers'
     * per-connection send limits (rtcsignal: 1 MiB) */
    if (!o_window) { o_window = (256 << 10) / pllen; if (o_window < 32) o_window = 32; if (o_window > 4096) o_window = 4096; }
  }
  latcap = mode == 1 ? (size_t)((o_dur + 2) * o_rate + 8) * n_recv : mode == 2 ? 20000000 : 0;
  if (latcap) lat = malloc(latcap * sizeof *lat);
  if (mode == 2) { /* each peer's frame: {"to":"<partner>", ...payload} */
    npairs = o_n / 2; pair_dir = calloc(npairs, 1);
    if (!o_window) o_window = 256;
    if (o_window > npairs) o_window = npairs;
    for (int i = 0; i < o_n; i++) {
      Conn *c = cs[i], *peer = cs[i ^ 1];
      if (!peer->peer[0]) die_json("no peerId in greeting (server has no rooms?)");
      char *m = malloc(pllen + 100);
      int k = sprintf(m, "{\"to\":\"%s\",", peer->peer);
      memcpy(m + k, pl + 1, pllen - 1);
      c->msg = build_frame(m, k + pllen - 1, &c->msglen);
      c->tsoff = c->msglen - (k + pllen - 1) + (k - 1 + pl_ts);
      free(m);
    }
    poll_ms(200); /* let presence messages (joined / peer-joined) drain */
  }
  double tw = now_s() + o_warm, tend = tw + o_dur, next = now_s(), last_t = now_s();
  uint64_t d0 = 0, s0 = 0, last_d = 0; double c0 = 0; int measuring = 0, stalled = 0;
  if (mode == 2) { for (int p = 0; p < o_window; p++) rooms_send(p); next_pair = o_window % npairs; }
  for (;;) {
    double t = now_s();
    if (!measuring && t >= tw) {
      measuring = sampling = 1; d0 = deliveries; s0 = sent; c0 = cpu_s(); tw = t;
      printf("{\"event\":\"measure\"}\n"); fflush(stdout);  /* the driver samples server CPU here */
    }
    if (t >= tend) break;
    if (deliveries != last_d) { last_d = deliveries; last_t = t; }
    else if (t - last_t > 3 && sent) { stalled = 1; break; }
    int wait = 2;
    if (mode == 0 && snd->st == S_OPEN) {
      int burst = 0;
      while (sent - done_msgs < (uint64_t)o_window && burst < 512) { queue(snd, frame, flen); sent++; burst++; }
      if (burst) flush_out(snd);
    } else if (mode == 1 && snd->st == S_OPEN) {
      if (t >= next) { stamp(frame + ts_at); queue(snd, frame, flen); sent++; flush_out(snd); next += 1 / o_rate; }
      wait = (int)((next - now_s()) * 1000); if (wait < 0) wait = 0; if (wait > 5) wait = 5;
    }
    poll_ms(wait);
  }
  double t1 = now_s(), c1 = cpu_s(), win = t1 - tw;
  uint64_t dd = deliveries - d0, ds = sent - s0;
  printf("{\"event\":\"end\"}\n"); fflush(stdout);
  if (mode == 1) { double te = now_s() + 0.5; while (now_s() < te) poll_ms(5); }
  sampling = 0;
  printf("{\"mode\":\"%s\",\"n\":%d,\"payload_bytes\":%zu,\"connect_s\":%.3f,\"measure_s\":%.3f,\"stalled\":%s,",
         o_mode, o_n, pllen, connect_s, win, stalled ? "true" : "false");
  printf("\"sent\":%llu,\"deliveries\":%llu,\"deliveries_per_s\":%.1f,\"sent_per_s\":%.1f,",
         (unsigned long long)ds, (unsigned long long)dd, dd / win, ds / win);
  if (mode == 0) printf("\"window\":%d,\"mbytes_per_s\":%.2f,", o_window, dd * (double)pllen / win / 1e6);
  if (mode == 1) printf("\"rate\":%.1f,\"expected_samples\":%llu,", o_rate, (unsigned long long)ds * n_recv);
  if (mode == 2) printf("\"window\":%d,\"pairs\":%d,", o_window, npairs);
  if (mode != 0) print_lat();
  print_tail(100 * (c1 - c0) / win);
  return stalled ? 3 : 0;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  for (int i = 1; i < argc; i++) {
    const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
    i++;
    if (!strcmp(k, "--host")) o_host = v;
    else if (!strcmp(k, "--port")) o_port = atoi(v);
    else if (!strcmp(k, "--path")) o_path = v;
    else if (!strcmp(k, "--mode")) o_mode = v;
    else if (!strcmp(k, "--n")) o_n = atoi(v);
    else if (!strcmp(k, "--conc")) o_conc = atoi(v);
    else if (!strcmp(k, "--window")) o_window = atoi(v);
    else if (!strcmp(k, "--duration")) o_dur = atof(v);
    else if (!strcmp(k, "--warmup")) o_warm = atof(v);
    else if (!strcmp(k, "--rate")) o_rate = atof(v);
    else if (!strcmp(k, "--timeout")) o_timeout = atof(v);
    else if (!strcmp(k, "--payload")) o_payload = v;
    else if (!strcmp(k, "--levels")) o_levels = v;
    else if (!strcmp(k, "--room-prefix")) o_room_prefix = v;
    else if (!strcmp(k, "--sources")) o_sources = atoi(v);
    else { fprintf(stderr, "unknown option %s\n", k); return 2; }
  }
  struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
  ep = epoll_create1(0);
  rbuf = malloc(RBUF);
  cs = calloc(o_n + 20064, sizeof *cs);
  if (!strcmp(o_mode, "fanout")) return run_traffic(0);
  if (!strcmp(o_mode, "latency")) return run_traffic(1);
  if (!strcmp(o_mode, "rooms")) return run_traffic(2);
  if (!strcmp(o_mode, "storm")) {
    printf("{\"event\":\"measure\"}\n"); fflush(stdout);
    double t0 = now_s(), c0 = cpu_s();
    int ok = open_until(o_n, t0 + o_timeout);
    double dt = now_s() - t0;
    printf("{\"event\":\"end\"}\n"); fflush(stdout);
    printf("{\"mode\":\"storm\",\"n\":%d,\"conc\":%d,\"ok\":%s,\"greeted\":%d,\"elapsed_s\":%.3f,\"conns_per_s\":%.1f,",
           o_n, o_conc, ok ? "true" : "false", n_greeted, dt, n_greeted / dt);
    print_tail(100 * (cpu_s() - c0) / dt);
    return ok ? 0 : 1;
  }
  if (!strcmp(o_mode, "idle")) {
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = STDIN_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e);
    char *levels = strdup(o_levels), *save = NULL;
    for (char *tok = strtok_r(levels, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
      int level = atoi(tok);
      if (level > o_n + 20000) level = o_n + 20000;
      double t0 = now_s();
      int ok = open_until(level, t0 + o_timeout);
      printf("{\"mode\":\"idle\",\"level\":%d,\"ok\":%s,\"greeted\":%d,\"connect_s\":%.3f,",
             level, ok ? "true" : "false", n_greeted, now_s() - t0);
      print_tail(0);
      double c0 = cpu_s(), tw = now_s();
      char line[64] = "q";
      for (stdin_line = 0; !stdin_line;) poll_ms(250);  /* keep answering pings meanwhile */
      ssize_t k = read(0, line, sizeof line - 1);
      printf("{\"mode\":\"idle\",\"level\":%d,\"held_s\":%.1f,", level, now_s() - tw);
      print_tail(100 * (cpu_s() - c0) / (now_s() - tw));
      if (k <= 0 || line[0] == 'q') break;
    }
    return 0;
  }
  fprintf(stderr, "unknown mode %s\n", o_mode);
  return 2;
}
