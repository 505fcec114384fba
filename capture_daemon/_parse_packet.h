/* One packet's headers, as capture_daemon.parse.parse_numpy reads them: the per-packet step of
 * _accel_parse.c (which stores the fields into the Headers arrays) and of _accel_anon.c's
 * rewrite_records (which anonymizes the packet while its header bytes are still in the CPU's
 * cache, without the arrays). One definition, so both read every packet the same way.
 *
 * pp_parse(buf, buflen, o, c, w, linktype, h, src6, dst6) fills h, and the 16-byte IPv6
 * addresses (zero unless h->ipver == 6); returns -1, with nothing reliable written, when the
 * packet lies outside buf. linktype must satisfy pp_supported_linktype.
 *
 * Every byte read is inside its packet (o <= pos, pos + width <= o + c) and the packet inside
 * buf (checked before anything is read), so hostile packets cannot make it read out of bounds.
 */
#ifndef GIMS_PARSE_PACKET_H
#define GIMS_PARSE_PACKET_H

#include <stdint.h>
#include <string.h>

enum {
    PP_DLT_NULL = 0, PP_DLT_EN10MB = 1, PP_DLT_RAW_BSD = 12, PP_DLT_RAW_OBSD = 14, PP_LINKTYPE_RAW = 101,
    PP_DLT_LOOP = 108, PP_DLT_LINUX_SLL = 113, PP_DLT_IPV4 = 228, PP_DLT_IPV6 = 229, PP_DLT_LINUX_SLL2 = 276,
};
enum { PP_ETH_IPV4 = 0x0800, PP_ETH_IPV6 = 0x86DD, PP_ETH_ARP = 0x0806 };
enum { PP_MAX_VLAN_TAGS = 4, PP_MAX_IPV6_EXT_HEADERS = 8 };

/* The Headers fields of one packet (parse.py's Headers, same meaning and values). */
typedef struct {
    unsigned ethertype;
    int64_t l3;          /* -1: no network header */
    unsigned ipver;      /* 4, 6 or 0 */
    int32_t vlan;
    unsigned proto;
    int64_t l4;
    int frag_later;
    unsigned sport, dport, tcpflags, tos;
    int64_t iplen;
    uint32_t src4, dst4;
    int malformed;
} PpHeaders;

/* int64 addition/subtraction that wraps like numpy's instead of being undefined */
static inline int64_t pp_wadd(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }
static inline int64_t pp_wsub(int64_t a, int64_t b) { return (int64_t)((uint64_t)a - (uint64_t)b); }

static inline uint16_t pp_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t pp_be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
static inline int pp_is_vlan_tpid(unsigned et) { return et == 0x8100 || et == 0x88A8 || et == 0x9100; }
static inline int pp_is_ipv6_ext(unsigned nh) {
    return nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51 || nh == 135;
}
static inline int pp_is_port_proto(unsigned p) { return p == 6 || p == 17 || p == 132 || p == 136; }

static inline int pp_supported_linktype(long lt) {
    switch (lt) {
    case PP_DLT_NULL: case PP_DLT_EN10MB: case PP_DLT_RAW_BSD: case PP_DLT_RAW_OBSD: case PP_LINKTYPE_RAW:
    case PP_DLT_LOOP: case PP_DLT_LINUX_SLL: case PP_DLT_IPV4: case PP_DLT_IPV6: case PP_DLT_LINUX_SLL2:
        return 1;
    default:
        return 0;
    }
}

/* The packet at buf[o, o + c) (wire length w) lies inside buf. A negative caplen is harmless
 * (nothing is ever in range then), but o itself must be sane so that o + small constants cannot
 * wrap. */
static inline int pp_inside(int64_t buflen, int64_t o, int64_t c) { return !(o < 0 || o > buflen || c > buflen - o); }

static inline int pp_parse(const uint8_t *buf, int64_t buflen, int64_t o, int64_t c, int64_t w, long lt,
                           PpHeaders *h, uint8_t *s6, uint8_t *d6) {
    if (!pp_inside(buflen, o, c))
        return -1;
    const int64_t e = o + c; /* no overflow: o >= 0 and c <= buflen - o */
    /* pos..pos+width-1 captured (pos >= o >= 0 and pos + width <= e <= buflen) */
#define OK(pos, width) ((pos) >= o && (pos) <= e - (width))
    int32_t vlan = -1;
    unsigned et;
    int64_t l3;
    int short_link;

    switch (lt) {
    case PP_DLT_EN10MB:
    case PP_DLT_LINUX_SLL: {
        int64_t pos = o + (lt == PP_DLT_EN10MB ? 12 : 14);
        short_link = !OK(pos, 2);
        et = short_link ? 0 : pp_be16(buf + pos);
        pos += 2;
        for (int k = 0; k < PP_MAX_VLAN_TAGS; k++) {
            if (!(pp_is_vlan_tpid(et) && OK(pos, 4)))
                break;
            if (vlan < 0)
                vlan = (int32_t)(pp_be16(buf + pos) & 0x0FFF);
            et = pp_be16(buf + pos + 2);
            pos += 4;
        }
        l3 = pos;
        break;
    }
    case PP_DLT_LINUX_SLL2:
        et = OK(o, 2) ? pp_be16(buf + o) : 0;
        l3 = o + 20;
        short_link = !OK(o, 20);
        break;
    case PP_DLT_NULL:
    case PP_DLT_LOOP: {
        uint32_t raw = OK(o, 4) ? pp_be32(buf + o) : 0;
        if (lt == PP_DLT_NULL && raw > 0xFFFF) /* host byte order of the capturing machine */
            raw = ((raw & 0xFFu) << 24) | ((raw & 0xFF00u) << 8) | ((raw >> 8) & 0xFF00u) | (raw >> 24);
        et = raw == 2 ? PP_ETH_IPV4 : (raw == 10 || raw == 24 || raw == 28 || raw == 30) ? PP_ETH_IPV6 : 0;
        l3 = o + 4;
        short_link = !OK(o, 4);
        break;
    }
    default: { /* the raw IP link types */
        unsigned version = OK(o, 1) ? (unsigned)(buf[o] >> 4) : 0;
        et = version == 4 ? PP_ETH_IPV4 : version == 6 ? PP_ETH_IPV6 : 0;
        l3 = o;
        short_link = 0;
        break;
    }
    }
    int malformed = short_link && w > 0;

    const int et4 = et == PP_ETH_IPV4, et6 = et == PP_ETH_IPV6;
    const int ip_claimed = et4 || et6;
    const unsigned first = OK(l3, 1) ? buf[l3] : 0; /* only used where l3 is captured */
    const unsigned version = first >> 4;
    if (ip_claimed && OK(l3, 1) && ((et4 && version != 4) || (et6 && version != 6)))
        malformed = 1;
    const int64_t wire_end = pp_wadd(o, w);
    if ((et4 && pp_wadd(l3, 20) > wire_end) || (et6 && pp_wadd(l3, 40) > wire_end))
        malformed = 1;
    int is4 = et4 && OK(l3, 20) && version == 4;
    const int is6 = et6 && OK(l3, 40) && version == 6;

    unsigned proto = 0, tos = 0;
    int frag_later = 0;
    uint32_t src4 = 0, dst4 = 0;
    int64_t l4 = -1, iplen = 0;
    if (is4) {
        const int64_t ihl = (int64_t)(first & 0x0F) * 4;
        const int64_t total4 = pp_be16(buf + l3 + 2);
        if (ihl < 20 || total4 < ihl) {
            malformed = 1;
            is4 = 0;
        } else {
            frag_later = (pp_be16(buf + l3 + 6) & 0x1FFF) != 0;
            proto = buf[l3 + 9];
            tos = buf[l3 + 1];
            src4 = pp_be32(buf + l3 + 12);
            dst4 = pp_be32(buf + l3 + 16);
            if (!frag_later)
                l4 = l3 + ihl;
            iplen = total4;
        }
    }
    if (is6) {
        memcpy(s6, buf + l3 + 8, 16);
        memcpy(d6, buf + l3 + 24, 16);
        tos = (unsigned)((pp_be16(buf + l3) >> 4) & 0xFF);
        const int64_t plen6 = pp_be16(buf + l3 + 4);
        iplen = plen6 == 0 ? pp_wsub(w, l3 - o) : plen6 + 40;
        unsigned nh = buf[l3 + 6];
        int64_t pos = l3 + 40;
        for (int k = 0; k < PP_MAX_IPV6_EXT_HEADERS; k++) {
            if (!pp_is_ipv6_ext(nh) || !OK(pos, 8))
                break; /* an unreadable header stays the final protocol, l4 points at it */
            const unsigned nxt = buf[pos];
            const int64_t hlen_byte = buf[pos + 1];
            int later = 0;
            int64_t hlen;
            if (nh == 44) {
                later = (pp_be16(buf + pos + 2) >> 3) != 0;
                hlen = 8;
            } else if (nh == 51) {
                hlen = (hlen_byte + 2) * 4;
            } else {
                hlen = (hlen_byte + 1) * 8;
            }
            frag_later |= later;
            nh = nxt;
            pos += hlen;
            if (later)
                break;
        }
        proto = nh;
        l4 = frag_later ? -1 : pos;
    } else {
        memset(s6, 0, 16);
        memset(d6, 0, 16);
    }
    /* Where the L4 header does not start inside the capture, there is none to look at. */
    if (!OK(l4, 1))
        l4 = -1;
    unsigned sport = 0, dport = 0, tcpflags = 0;
    if (l4 >= 0) {
        if (pp_is_port_proto(proto) && OK(l4, 4)) {
            sport = pp_be16(buf + l4);
            dport = pp_be16(buf + l4 + 2);
        }
        if (((proto == 1 && is4) || (proto == 58 && is6)) && OK(l4, 2))
            dport = pp_be16(buf + l4);
        if (proto == 6 && OK(l4, 14))
            tcpflags = buf[l4 + 13];
    }
#undef OK
    h->ethertype = et;
    h->l3 = (ip_claimed || et == PP_ETH_ARP) ? l3 : -1;
    h->ipver = is4 ? 4 : is6 ? 6 : 0;
    h->vlan = vlan;
    h->proto = proto;
    h->l4 = l4;
    h->frag_later = frag_later;
    h->sport = sport;
    h->dport = dport;
    h->tcpflags = tcpflags;
    h->tos = tos;
    h->iplen = iplen;
    h->src4 = src4;
    h->dst4 = dst4;
    h->malformed = malformed;
    return 0;
}

#endif
