/* relay.c - a deliberately trivial C broadcast relay, used only to show that the load generator
 * is not the bottleneck: it does the least work a relay can do (no JSON, no validation, no
 * Sec-WebSocket-Accept computation - the load generator does not check it), frames each message
 * once and coalesces each receiver's output into one write per loop round. Whatever the load
 * generator measures against this is its own capacity, far above the real servers' figures.
 *
 *   relay PORT     (listens on 127.0.0.1:PORT, any path)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct Cl {
  int fd, open, dirty;
  char *in; size_t nin, capin;
  char *out; size_t nout, capout;
  struct Cl *next, *prev;
} Cl;
static Cl head = {.next = &head, .prev = &head};
static Cl **dirty; static int ndirty, capdirty;
static int ep;

static void put(Cl *c, const void *p, size_t n) {
  if (c->nout + n > c->capout) { c->capout = 2 * (c->nout + n) + 4096; c->out = realloc(c->out, c->capout); }
  memcpy(c->out + c->nout, p, n); c->nout += n;
  if (!c->dirty) {
    c->dirty = 1;
    if (ndirty == capdirty) { capdirty = 2 * capdirty + 64; dirty = realloc(dirty, capdirty * sizeof *dirty); }
    dirty[ndirty++] = c;
  }
}
static void drop(Cl *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd);
  c->prev->next = c->next; c->next->prev = c->prev;
  c->fd = -1; c->nout = 0;  /* freed lazily: may still sit in the dirty list */
}
static void broadcast(Cl *from, const char *p, size_t n) {
  unsigned char h[10]; size_t hl = 2; h[0] = 0x81;
  if (n < 126) h[1] = n;
  else if (n < 65536) { h[1] = 126; h[2] = n >> 8; h[3] = n; hl = 4; }
  else { h[1] = 127; for (int i = 0; i < 8; i++) h[2 + i] = (uint64_t)n >> (56 - 8 * i); hl = 10; }
  for (Cl *c = head.next; c != &head; c = c->next)
    if (c != from && c->open) { put(c, h, hl); put(c, p, n); }
}
static void on_data(Cl *c) {
  if (c->capin - c->nin < 65536) { c->capin = 2 * c->capin + 65536; c->in = realloc(c->in, c->capin); }
  ssize_t k = recv(c->fd, c->in + c->nin, c->capin - c->nin, 0);
  if (k == 0 || (k < 0 && errno != EAGAIN)) { drop(c); return; }
  if (k < 0) return;
  c->nin += k;
  size_t off = 0;
  if (!c->open) {
    char *e = memmem(c->in, c->nin, "\r\n\r\n", 4);
    if (!e) return;
    off = e + 4 - c->in; c->open = 1;
    static const char ok[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Accept: x\r\n\r\n\x81\x14{\"type\":\"connected\"}";
    put(c, ok, sizeof ok - 1);
  }
  while (c->nin - off >= 6) {
    unsigned char *h = (unsigned char *)c->in + off;
    size_t n = h[1] & 0x7f, hl = 2;
    if (n == 126) { n = (h[2] << 8) | h[3]; hl = 4; }
    else if (n == 127) { n = 0; for (int i = 2; i < 10; i++) n = (n << 8) | h[i]; hl = 10; }
    hl += 4;
    if (c->nin - off < hl + n) break;
    unsigned char *m = h + hl - 4, *p = h + hl;
    for (size_t i = 0; i < n; i++) p[i] ^= m[i & 3];
    int op = h[0] & 15;
    if (op == 1 || op == 2) broadcast(c, (char *)p, n);
    else if (op == 8) { drop(c); return; }
    off += hl + n;
  }
  memmove(c->in, c->in + off, c->nin - off); c->nin -= off;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  int port = argc > 1 ? atoi(argv[1]) : 9999, one = 1;
  int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
  ep = epoll_create1(0);
  struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
  struct epoll_event ev[512];
  for (;;) {
    int k = epoll_wait(ep, ev, 512, -1);
    for (int i = 0; i < k; i++) {
      if (!ev[i].data.ptr) {
        int fd;
        while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          Cl *c = calloc(1, sizeof *c); c->fd = fd;
          c->next = head.next; c->prev = &head; head.next->prev = c; head.next = c;
          struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
        }
        continue;
      }
      Cl *c = ev[i].data.ptr;
      if (c->fd >= 0) on_data(c);
    }
    /* one write per receiver per round; a receiver that cannot keep up is simply blocked on */
    for (int i = 0; i < ndirty; i++) {
      Cl *c = dirty[i]; size_t off = 0;
      while (c->fd >= 0 && off < c->nout) {
        ssize_t w = send(c->fd, c->out + off, c->nout - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EAGAIN) { struct pollfd pf = {.fd = c->fd, .events = POLLOUT}; poll(&pf, 1, -1); continue; }
        if (w <= 0) { drop(c); break; }
        off += w;
      }
      c->nout = 0; c->dirty = 0;
    }
    ndirty = 0;
  }
}
