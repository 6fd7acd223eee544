// kmsbench is the warm-connection load generator of bench/bench_seal.py and
// bench/bench_onemillion.py: grpc-go (the client stack Talos uses), one
// ClientConn per client opened before the clock starts and kept for the
// whole run, client i talking to endpoint i mod n, one call in flight per
// client. The same binary drives kmsd (Seal or Unseal over mutual-auth-free
// TLS, as Talos does) and etcd 3.4 (KV/Put over plaintext h2c), so both
// servers see the same client machine load.
//
// Messages are encoded by hand with protowire and a pass-through codec, like
// tests/integration/talosclient (no generated code).
//
// Usage:
//
//	kmsbench -op seal|unseal|put -endpoints host:port[,...] [-ca FILE]
//	         [-clients 16] [-duration 8s] [-warmup 1s] [-blobs FILE] [-lat FILE]
//
// -op seal:   Seal 32 random bytes for a fresh random node UUID per call.
// -op unseal: Unseal the blobs of FILE (talosclient seal output lines), checks the bytes.
// -op put:    etcd KV/Put of a 32-byte value under bench/<client>/<n> (plaintext).
// -op rack:   -nodes N -volumes 3 -window 2s [-retry-every 30s -max-attempts 10]:
//             a rack boots (new connection per Unseal, nodes starting within
//             the window, optionally retrying like Talos; see rackBoot).
// Prints one JSON object: ok, failures by code, per_s, p50/p90/p99/max ms;
// -lat FILE writes every latency (ms, one a line) for plots.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

type rawCodec struct{}

type frame struct{ b []byte }

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return v.(*frame).b, nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	v.(*frame).b = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func field(b []byte, num protowire.Number, v []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func respData(b []byte) []byte {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, _ := protowire.ConsumeBytes(b)
			return v
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return nil
		}
		b = b[m:]
	}
	return nil
}

func uuid4() string {
	var u [16]byte
	_, _ = rand.Read(u[:])
	u[6] = (u[6] & 0x0f) | 0x40
	u[8] = (u[8] & 0x3f) | 0x80
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

type sealed struct {
	UUID string `json:"uuid"`
	Blob string `json:"blob"`
	Data string `json:"data"`
}

type report struct {
	Op       string         `json:"op"`
	Clients  int            `json:"clients"`
	Seconds  float64        `json:"seconds"`
	OK       int            `json:"ok"`
	Failures map[string]int `json:"failures"`
	Wrong    int            `json:"wrong_bytes"`
	PerS     float64        `json:"per_s"`
	P50      float64        `json:"p50_ms"`
	P90      float64        `json:"p90_ms"`
	P99      float64        `json:"p99_ms"`
	Max      float64        `json:"max_ms"`
}

func main() {
	op := flag.String("op", "seal", "seal | unseal | put")
	eps := flag.String("endpoints", "127.0.0.1:4050", "comma-separated host:port list")
	caFile := flag.String("ca", "", "PEM CA to verify kmsd (seal, unseal)")
	clients := flag.Int("clients", 16, "concurrent clients, one warm connection and one call in flight each")
	dur := flag.Duration("duration", 8*time.Second, "measured time")
	warm := flag.Duration("warmup", time.Second, "unmeasured load before the clock starts")
	blobsFile := flag.String("blobs", "", "talosclient seal output (unseal)")
	latFile := flag.String("lat", "", "write every measured latency (ms) here")
	blobsOut := flag.String("blobs-out", "", "seal: write every sealed blob here (talosclient seal lines)")
	rackNodes := flag.Int("nodes", 1000, "rack: simulated Talos nodes")
	rackVolumes := flag.Int("volumes", 3, "rack: encrypted volumes per node (one Unseal each)")
	rackWindow := flag.Duration("window", 2*time.Second, "rack: nodes start uniformly within this")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline per RPC")
	retryEvery := flag.Duration("retry-every", 0, "rack: after a failed Unseal wait this, then retry on the next endpoint (Talos: 30s); 0 = no retry")
	maxAttempts := flag.Int("max-attempts", 10, "rack: calls per volume at most when -retry-every > 0")
	flag.Parse()

	endpoints := strings.Split(*eps, ",")
	var creds grpc.DialOption
	if *op == "put" {
		creds = grpc.WithInsecure()
	} else {
		pem, err := ioutil.ReadFile(*caFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kmsbench: -ca:", err)
			os.Exit(64)
		}
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(pem)
		creds = grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots,
			ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}))
	}
	var blobs []sealed
	if *op == "unseal" || *op == "rack" {
		f, err := os.Open(*blobsFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kmsbench: -blobs:", err)
			os.Exit(64)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var s sealed
			if json.Unmarshal(sc.Bytes(), &s) == nil && s.Blob != "" {
				blobs = append(blobs, s)
			}
		}
		f.Close()
		if len(blobs) == 0 {
			fmt.Fprintln(os.Stderr, "kmsbench: no blobs")
			os.Exit(64)
		}
	}
	if *op == "rack" {
		rackBoot(endpoints, creds, blobs, *rackNodes, *rackVolumes, *rackWindow, *timeout, *latFile,
			*retryEvery, *maxAttempts)
		return
	}
	method := map[string]string{"seal": "/sidero.kms.KMSService/Seal",
		"unseal": "/sidero.kms.KMSService/Unseal", "put": "/etcdserverpb.KV/Put"}[*op]
	if method == "" {
		fmt.Fprintln(os.Stderr, "kmsbench: unknown -op", *op)
		os.Exit(64)
	}

	conns := make([]*grpc.ClientConn, *clients)
	for i := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := grpc.DialContext(ctx, endpoints[i%len(endpoints)], creds, grpc.WithBlock())
		cancel()
		if err != nil {
			fmt.Fprintln(os.Stderr, "kmsbench: dial:", err)
			os.Exit(2)
		}
		conns[i] = c
	}

	var mu sync.Mutex
	var lats []float64
	var sealedOut []sealed
	fails := map[string]int{}
	wrong := 0
	var wg sync.WaitGroup
	start := time.Now()
	measFrom := start.Add(*warm)
	stop := measFrom.Add(*dur)
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(id int) {
			defer wg.Done()
			var mine []float64
			myFails := map[string]int{}
			myWrong := 0
			var mySealed []sealed
			val := make([]byte, 32)
			for k := 0; ; k++ {
				t0 := time.Now()
				if !t0.Before(stop) {
					break
				}
				var req, want []byte
				var uuid string
				switch *op {
				case "seal":
					_, _ = rand.Read(val)
					uuid = uuid4()
					req = field(field(nil, 1, []byte(uuid)), 2, val)
				case "unseal":
					b := blobs[(id+k*(*clients))%len(blobs)]
					raw, _ := base64.StdEncoding.DecodeString(b.Blob)
					want, _ = base64.StdEncoding.DecodeString(b.Data)
					req = field(field(nil, 1, []byte(b.UUID)), 2, raw)
				case "put":
					_, _ = rand.Read(val)
					req = field(field(nil, 1, []byte(fmt.Sprintf("bench/%d/%d", id, k))), 2, val)
				}
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				var resp frame
				err := conns[id].Invoke(ctx, method, &frame{b: req}, &resp, grpc.ForceCodec(rawCodec{}))
				cancel()
				t1 := time.Now()
				if t0.Before(measFrom) {
					continue
				}
				if err != nil {
					myFails[status.Code(err).String()]++
					time.Sleep(10 * time.Millisecond)
					continue
				}
				if *op == "unseal" && len(want) > 0 && string(respData(resp.b)) != string(want) {
					myWrong++
					continue
				}
				if *op == "seal" && len(respData(resp.b)) == 0 {
					myWrong++
					continue
				}
				if *op == "seal" && *blobsOut != "" {
					mySealed = append(mySealed, sealed{UUID: uuid,
						Blob: base64.StdEncoding.EncodeToString(respData(resp.b)),
						Data: base64.StdEncoding.EncodeToString(val)})
				}
				mine = append(mine, float64(t1.Sub(t0).Microseconds())/1000)
			}
			mu.Lock()
			lats = append(lats, mine...)
			for c, n := range myFails {
				fails[c] += n
			}
			wrong += myWrong
			sealedOut = append(sealedOut, mySealed...)
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	for _, c := range conns {
		c.Close()
	}
	sort.Float64s(lats)
	rep := report{Op: *op, Clients: *clients, Seconds: dur.Seconds(), OK: len(lats),
		Failures: fails, Wrong: wrong}
	rep.PerS = float64(len(lats)) / dur.Seconds()
	if n := len(lats); n > 0 {
		rep.P50, rep.P90, rep.P99, rep.Max = lats[n/2], lats[n*9/10], lats[n*99/100], lats[n-1]
	}
	if *latFile != "" {
		w, err := os.Create(*latFile)
		if err == nil {
			bw := bufio.NewWriter(w)
			for _, l := range lats {
				fmt.Fprintf(bw, "%.3f\n", l)
			}
			bw.Flush()
			w.Close()
		}
	}
	if *blobsOut != "" {
		w, err := os.Create(*blobsOut)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kmsbench: -blobs-out:", err)
			os.Exit(2)
		}
		bw := bufio.NewWriter(w)
		for _, b := range sealedOut {
			line, _ := json.Marshal(b)
			bw.Write(append(line, '\n'))
		}
		bw.Flush()
		w.Close()
	}
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
	if wrong > 0 {
		os.Exit(100)
	}
}

// rackBoot: a whole rack powers on. Node i starts at a uniformly random
// moment within window (its power-on moment) and unseals its volumes one
// after the other, each call over a NEW connection (dial, TLS handshake, one
// call, close) from the node's own source address; volume v's first call goes
// to endpoint (i+v) mod n.
//
// retryEvery > 0 models Talos (any RPC error: next key slot, then retry every
// 30 s, no backoff): a call that fails with a gRPC error is retried retryEvery
// after the failure on the next endpoint of the list (pick_first over DNS A
// records moves on), up to maxAttempts calls per volume; the node goes on to
// its next volume only once this one is unsealed or out of attempts. A reply
// with the wrong bytes is never retried (hard failure). retryEvery == 0: one
// call per volume, as before.
//
// Report (one JSON object):
//
//	ok, p50/p90/p99/max_ms  first attempts: calls that succeeded on the
//	                        first try and their latency (the -lat file too);
//	                        with retryEvery == 0 every call is a first try
//	first_failures          first attempts that failed, by code
//	failures                calls that failed, ALL attempts, by code
//	                        (WRONG_BYTES included)
//	attempts                calls made
//	retried                 failed calls that were retried, by code
//	unsealed                volumes finally unsealed (right bytes)
//	lost                    volumes still sealed after maxAttempts calls
//	wrong_bytes             volumes whose reply had the wrong bytes
//	volume_p50/p99/max_ms   node's power-on -> that volume unsealed, over
//	                        unsealed volumes
//	node_done_p99/max_s     node's power-on -> its last volume unsealed, over
//	                        nodes with every volume unsealed
//	total_s                 start -> the last node finished
//
// Exit 1: retryEvery == 0, any failed call; retryEvery > 0, lost > 0 or
// any wrong bytes.
func rackBoot(endpoints []string, creds grpc.DialOption, blobs []sealed, nodes, volumes int,
	window, timeout time.Duration, latFile string, retryEvery time.Duration, maxAttempts int) {
	if retryEvery <= 0 || maxAttempts < 1 {
		maxAttempts = 1
	}
	type call struct {
		lat     float64
		code    string
		attempt int
		retried bool
	}
	type volume struct {
		ready    float64 // ms since the node's power-on, -1 if not unsealed
		wrong    bool
		lastNode bool // the node's last volume
		nodeOK   bool // every volume of the node unsealed (set on the last one)
	}
	calls := make(chan call, nodes*volumes*maxAttempts)
	vols := make(chan volume, nodes*volumes)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < nodes; i++ {
		var rb [8]byte
		_, _ = rand.Read(rb[:])
		off := time.Duration(uint64(rb[0])|uint64(rb[1])<<8|uint64(rb[2])<<16|uint64(rb[3])<<24) %
			(window + 1)
		wg.Add(1)
		go func(id int, off time.Duration) {
			defer wg.Done()
			time.Sleep(off)
			powerOn := start.Add(off)
			// Every node has its own address (127.1.x.y), as in a
			// rack: kmsd's per-address limits see what they would.
			src := &net.TCPAddr{IP: net.IPv4(127, 1, byte(id/250), byte(id%250+1))}
			dialer := grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				d := net.Dialer{LocalAddr: src}
				return d.DialContext(ctx, "tcp", addr)
			})
			nodeOK := true
			for v := 0; v < volumes; v++ {
				b := blobs[(id*volumes+v)%len(blobs)]
				raw, _ := base64.StdEncoding.DecodeString(b.Blob)
				want, _ := base64.StdEncoding.DecodeString(b.Data)
				req := field(field(nil, 1, []byte(b.UUID)), 2, raw)
				vol := volume{ready: -1}
				for a := 0; a < maxAttempts; a++ {
					if a > 0 {
						time.Sleep(retryEvery)
					}
					t0 := time.Now()
					ctx, cancel := context.WithTimeout(context.Background(), timeout)
					code := "OK"
					conn, err := grpc.DialContext(ctx, endpoints[(id+v+a)%len(endpoints)], creds, dialer)
					if err == nil {
						var resp frame
						err = conn.Invoke(ctx, "/sidero.kms.KMSService/Unseal", &frame{b: req}, &resp,
							grpc.ForceCodec(rawCodec{}))
						conn.Close()
						if err == nil && string(respData(resp.b)) != string(want) {
							code = "WRONG_BYTES"
						}
					}
					cancel()
					t1 := time.Now()
					if err != nil {
						code = status.Code(err).String()
					}
					retry := err != nil && a+1 < maxAttempts
					calls <- call{float64(t1.Sub(t0).Microseconds()) / 1000, code, a, retry}
					if code == "OK" {
						vol.ready = float64(t1.Sub(powerOn).Microseconds()) / 1000
					}
					vol.wrong = code == "WRONG_BYTES"
					if !retry {
						break
					}
				}
				if vol.ready < 0 {
					nodeOK = false
				}
				if v == volumes-1 {
					vol.lastNode, vol.nodeOK = true, nodeOK
				}
				vols <- vol
			}
		}(i, off)
	}
	wg.Wait()
	total := time.Since(start)
	close(calls)
	close(vols)
	var lats []float64
	fails, firstFails, retried := map[string]int{}, map[string]int{}, map[string]int{}
	attempts := 0
	for c := range calls {
		attempts++
		if c.code == "OK" {
			if c.attempt == 0 {
				lats = append(lats, c.lat)
			}
			continue
		}
		fails[c.code]++
		if c.attempt == 0 {
			firstFails[c.code]++
		}
		if c.retried {
			retried[c.code]++
		}
	}
	var ready, done []float64
	lost, wrong := 0, 0
	for v := range vols {
		switch {
		case v.ready >= 0:
			ready = append(ready, v.ready)
		case v.wrong:
			wrong++
		default:
			lost++
		}
		if v.lastNode && v.nodeOK {
			done = append(done, v.ready/1000)
		}
	}
	sort.Float64s(lats)
	sort.Float64s(ready)
	sort.Float64s(done)
	rep := map[string]interface{}{"op": "rack", "nodes": nodes, "volumes": volumes,
		"window_s": window.Seconds(), "total_s": total.Seconds(), "ok": len(lats),
		"failures": fails, "first_failures": firstFails, "retry_every_s": retryEvery.Seconds(),
		"max_attempts": maxAttempts, "attempts": attempts, "retried": retried,
		"unsealed": len(ready), "lost": lost, "wrong_bytes": wrong}
	if n := len(lats); n > 0 {
		rep["p50_ms"], rep["p90_ms"], rep["p99_ms"], rep["max_ms"] =
			lats[n/2], lats[n*9/10], lats[n*99/100], lats[n-1]
	}
	if n := len(ready); n > 0 {
		rep["volume_p50_ms"], rep["volume_p99_ms"], rep["volume_max_ms"] =
			ready[n/2], ready[n*99/100], ready[n-1]
	}
	if n := len(done); n > 0 {
		rep["node_done_p99_s"], rep["node_done_max_s"] = done[n*99/100], done[n-1]
	}
	if latFile != "" {
		if w, err := os.Create(latFile); err == nil {
			bw := bufio.NewWriter(w)
			for _, l := range lats {
				fmt.Fprintf(bw, "%.3f\n", l)
			}
			bw.Flush()
			w.Close()
		}
	}
	j, _ := json.Marshal(rep)
	fmt.Println(string(j))
	if retryEvery > 0 {
		if lost > 0 || wrong > 0 {
			os.Exit(1)
		}
	} else if len(fails) > 0 {
		os.Exit(1)
	}
}
