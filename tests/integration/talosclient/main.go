// talosclient is a test client that behaves like a Talos node talking to a
// network KMS (sidero.kms.KMSService): grpc-go, a NEW connection (Dial +
// Close) for every RPC, a 10 s deadline per RPC, TLS verified against a CA
// file (or plaintext h2c), and failover to the next address when a
// connection is refused: all endpoints are handed to one ClientConn through
// a manual resolver with grpc-go's default pick_first policy, as Talos gets
// them from several A records behind one DNS name.
//
// Messages are encoded by hand with protowire and a pass-through codec (no
// generated code: Debian's protoc-gen-go output does not run under
// grpc-go 1.33).
//
// Usage: talosclient [global flags] <command> [flags]
//
//	global: -endpoints host:port[,host:port...]  (grpc:// = plaintext, https:// = TLS)
//	        -ca FILE | -plaintext   -servername NAME   -timeout 10s
//	seal      -uuid U [-n N]                 JSON lines {"uuid","blob","data"}
//	unseal    -uuid U -blob B64              prints data (base64)
//	roundtrip -uuid U [-seal-endpoint X] [-unseal-endpoint Y]
//	load      -clients 8 -duration 10s -blobs FILE (seal output lines) [-rotate] [-once]
//	probe     -tls12only | -noalpn           raw crypto/tls + one gRPC call
//	burst     -n N -uuid U|-uuids U,U.. [-blob B64 | -seal] [-sources IP,IP...] [-parallel P]
//	          N unseals of B64 (or seals of random data), each from the next
//	          source address; prints {"codes":{"OK":n,...},"elapsed_ms":t}
//
// Exit status: the gRPC status code of the failing RPC (0 = OK), 100 when an
// unseal returned OK with the wrong bytes, 64 on usage errors, 2 when a
// probe did not reach gRPC.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	methodSeal   = "/sidero.kms.KMSService/Seal"
	methodUnseal = "/sidero.kms.KMSService/Unseal"
	exitMismatch = 100
	exitUsage    = 64
)

// ---- codec: bytes in, bytes out ------------------------------------------

type rawCodec struct{}

type frame struct{ b []byte }

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	f, ok := v.(*frame)
	if !ok {
		return nil, fmt.Errorf("rawCodec: unexpected %T", v)
	}
	return f.b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	f, ok := v.(*frame)
	if !ok {
		return fmt.Errorf("rawCodec: unexpected %T", v)
	}
	f.b = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

// Request{string node_uuid = 1; bytes data = 2;}
func encodeRequest(uuid string, data []byte) []byte {
	var b []byte
	if uuid != "" {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, uuid)
	}
	if len(data) > 0 {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, data)
	}
	return b
}

// Response{bytes data = 1;}
func decodeResponse(b []byte) ([]byte, error) {
	var data []byte
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			data = append([]byte(nil), v...)
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return nil, protowire.ParseError(m)
		}
		b = b[m:]
	}
	return data, nil
}

// ---- connection per RPC ----------------------------------------------------

type client struct {
	endpoints  []string
	plaintext  bool
	roots      *x509.CertPool
	serverName string
	timeout    time.Duration
	source     net.IP // local address to bind (nil: the kernel's choice)
}

var resolverSeq int64

func splitEndpoints(s string) ([]string, bool, error) {
	var out []string
	plain := false
	for _, e := range strings.Split(s, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		switch {
		case strings.HasPrefix(e, "grpc://"):
			plain = true
			e = strings.TrimPrefix(e, "grpc://")
		case strings.HasPrefix(e, "https://"):
			e = strings.TrimPrefix(e, "https://")
		}
		if _, _, err := net.SplitHostPort(e); err != nil {
			return nil, false, fmt.Errorf("endpoint %q: %v", e, err)
		}
		out = append(out, e)
	}
	if len(out) == 0 {
		return nil, false, errors.New("no endpoints")
	}
	return out, plain, nil
}

// call dials a fresh ClientConn over all endpoints (pick_first), makes one
// unary call and closes the connection, like Talos's KMS client.
func (c *client) call(endpoints []string, method string, req []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()

	scheme := fmt.Sprintf("talos%d", atomic.AddInt64(&resolverSeq, 1))
	r := manual.NewBuilderWithScheme(scheme)
	addrs := make([]resolver.Address, 0, len(endpoints))
	for _, e := range endpoints {
		addrs = append(addrs, resolver.Address{Addr: e})
	}
	r.InitialState(resolver.State{Addresses: addrs})

	opts := []grpc.DialOption{grpc.WithResolvers(r)}
	if c.source != nil {
		src := &net.TCPAddr{IP: c.source}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: src}
			return d.DialContext(ctx, "tcp", addr)
		}))
	}
	if c.plaintext {
		opts = append(opts, grpc.WithInsecure())
	} else {
		name := c.serverName
		if name == "" {
			name, _, _ = net.SplitHostPort(endpoints[0])
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs:    c.roots,
			ServerName: name,
			MinVersion: tls.VersionTLS12,
		})))
	}
	conn, err := grpc.DialContext(ctx, scheme+":///kms", opts...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	var resp frame
	err = conn.Invoke(ctx, method, &frame{b: req}, &resp, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		return nil, err
	}
	return decodeResponse(resp.b)
}

func (c *client) seal(endpoints []string, uuid string, data []byte) ([]byte, error) {
	return c.call(endpoints, methodSeal, encodeRequest(uuid, data))
}

func (c *client) unseal(endpoints []string, uuid string, blob []byte) ([]byte, error) {
	return c.call(endpoints, methodUnseal, encodeRequest(uuid, blob))
}

func exitFor(err error) int {
	if err == nil {
		return 0
	}
	return int(status.Code(err))
}

func fail(err error) {
	st := status.Convert(err)
	fmt.Fprintf(os.Stderr, "talosclient: %s: %s\n", st.Code(), st.Message())
	os.Exit(exitFor(err))
}

func usage(msg string) {
	fmt.Fprintln(os.Stderr, "talosclient:", msg)
	os.Exit(exitUsage)
}

type sealed struct {
	UUID string `json:"uuid"`
	Blob string `json:"blob"`
	Data string `json:"data"`
}

// ---- commands --------------------------------------------------------------

func cmdSeal(fs *flag.FlagSet, args []string) {
	uuid := fs.String("uuid", "", "node UUID")
	n := fs.Int("n", 1, "number of seals (one JSON line each)")
	c := parseAll(fs, args)
	if *uuid == "" {
		usage("seal: -uuid is required")
	}
	enc := json.NewEncoder(os.Stdout)
	for i := 0; i < *n; i++ {
		data := make([]byte, 32)
		if _, err := rand.Read(data); err != nil {
			usage(err.Error())
		}
		blob, err := c.seal(c.endpoints, *uuid, data)
		if err != nil {
			fail(err)
		}
		_ = enc.Encode(sealed{*uuid, base64.StdEncoding.EncodeToString(blob),
			base64.StdEncoding.EncodeToString(data)})
	}
}

func cmdUnseal(fs *flag.FlagSet, args []string) {
	uuid := fs.String("uuid", "", "node UUID")
	blob64 := fs.String("blob", "", "sealed blob (base64)")
	c := parseAll(fs, args)
	blob, err := base64.StdEncoding.DecodeString(*blob64)
	if err != nil {
		usage("unseal: -blob: " + err.Error())
	}
	data, err := c.unseal(c.endpoints, *uuid, blob)
	if err != nil {
		fail(err)
	}
	fmt.Println(base64.StdEncoding.EncodeToString(data))
}

func cmdRoundtrip(fs *flag.FlagSet, args []string) {
	uuid := fs.String("uuid", "", "node UUID")
	se := fs.String("seal-endpoint", "", "endpoint(s) for Seal (default -endpoints)")
	ue := fs.String("unseal-endpoint", "", "endpoint(s) for Unseal (default -endpoints)")
	n := fs.Int("n", 1, "round trips (more than 1: one JSON report, failures counted)")
	c := parseAll(fs, args)
	sealEps, unsealEps := c.endpoints, c.endpoints
	var err error
	if *se != "" {
		if sealEps, _, err = splitEndpoints(*se); err != nil {
			usage(err.Error())
		}
	}
	if *ue != "" {
		if unsealEps, _, err = splitEndpoints(*ue); err != nil {
			usage(err.Error())
		}
	}
	if *n > 1 {
		roundtrips(c, sealEps, unsealEps, *uuid, *n)
		return
	}
	data := make([]byte, 32)
	_, _ = rand.Read(data)
	blob, err := c.seal(sealEps, *uuid, data)
	if err != nil {
		fail(err)
	}
	got, err := c.unseal(unsealEps, *uuid, blob)
	if err != nil {
		fail(err)
	}
	if string(got) != string(data) {
		fmt.Fprintln(os.Stderr, "talosclient: unseal returned OK with the WRONG bytes")
		os.Exit(exitMismatch)
	}
	fmt.Printf("{\"ok\":true,\"blob_len\":%d}\n", len(blob))
}

// roundtrips seals and at once unseals n times (read-your-writes across
// replicas when the endpoints differ) and prints one JSON report: seal
// failures and unseal failures by gRPC code. Exit 1 on any unseal failure
// after a successful seal, exitMismatch on wrong bytes.
func roundtrips(c *client, sealEps, unsealEps []string, uuid string, n int) {
	rep := struct {
		OK           int            `json:"ok"`
		SealFailures map[string]int `json:"seal_failures"`
		Failures     map[string]int `json:"unseal_failures"`
		Wrong        int            `json:"wrong_bytes"`
	}{SealFailures: map[string]int{}, Failures: map[string]int{}}
	for i := 0; i < n; i++ {
		data := make([]byte, 32)
		_, _ = rand.Read(data)
		blob, err := c.seal(sealEps, uuid, data)
		if err != nil {
			rep.SealFailures[status.Code(err).String()]++
			continue
		}
		got, err := c.unseal(unsealEps, uuid, blob)
		switch {
		case err != nil:
			rep.Failures[status.Code(err).String()]++
		case string(got) != string(data):
			rep.Wrong++
		default:
			rep.OK++
		}
	}
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
	if rep.Wrong > 0 {
		os.Exit(exitMismatch)
	}
	if len(rep.Failures) > 0 {
		os.Exit(1)
	}
}

type second struct {
	T      int            `json:"t"`
	OK     int            `json:"ok"`
	Failed map[string]int `json:"failed,omitempty"`
	MaxMs  float64        `json:"max_ms"`
}

type loadReport struct {
	Total      int            `json:"total"`
	OK         int            `json:"ok"`
	Failures   map[string]int `json:"failures"`
	Wrong      int            `json:"wrong_bytes"`
	Retried    int            `json:"retried"`
	MaxMs      float64        `json:"max_latency_ms"`
	P50Ms      float64        `json:"p50_ms"`
	P99Ms      float64        `json:"p99_ms"`
	LongestGap float64        `json:"longest_failure_streak_ms"`
	Timeline   []second       `json:"timeline"`
}

func cmdLoad(fs *flag.FlagSet, args []string) {
	clients := fs.Int("clients", 8, "concurrent clients")
	dur := fs.Duration("duration", 10*time.Second, "how long")
	blobsFile := fs.String("blobs", "", "file of seal output lines")
	rotate := fs.Bool("rotate", false, "client i lists the endpoints starting at i mod n "+
		"(DNS round robin: a rack spreads over the replicas)")
	once := fs.Bool("once", false, "unseal every blob exactly once, then stop (no -duration)")
	retries := fs.Int("retry-unavailable", 0, "retry an Unseal that ends UNAVAILABLE or CANCELLED up to N "+
		"times on a new connection after 50 ms, as Talos retries (counted in \"retried\")")
	c := parseAll(fs, args)
	f, err := os.Open(*blobsFile)
	if err != nil {
		usage("load: " + err.Error())
	}
	var blobs []sealed
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var s sealed
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			usage("load: " + err.Error())
		}
		blobs = append(blobs, s)
	}
	f.Close()
	if len(blobs) == 0 {
		usage("load: no blobs")
	}

	type result struct {
		at   time.Duration
		lat  time.Duration
		code string
	}
	start := time.Now()
	var retried int64
	var mu sync.Mutex
	var results []result
	var wg sync.WaitGroup
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(id int) {
			defer wg.Done()
			eps := c.endpoints
			if *rotate {
				n := len(c.endpoints)
				eps = make([]string, 0, n)
				for j := 0; j < n; j++ {
					eps = append(eps, c.endpoints[(id+j)%n])
				}
			}
			for k := id; (*once && k < len(blobs)) || (!*once && time.Since(start) < *dur); k += *clients {
				b := blobs[k%len(blobs)]
				blob, _ := base64.StdEncoding.DecodeString(b.Blob)
				t0 := time.Now()
				got, err := c.unseal(eps, b.UUID, blob)
				for r := 0; r < *retries && (status.Code(err) == codes.Unavailable ||
					status.Code(err) == codes.Canceled); r++ {
					atomic.AddInt64(&retried, 1)
					time.Sleep(50 * time.Millisecond)
					got, err = c.unseal(eps, b.UUID, blob)
				}
				lat := time.Since(t0)
				code := status.Code(err).String()
				if err == nil && b.Data != "" && base64.StdEncoding.EncodeToString(got) != b.Data {
					code = "WRONG_BYTES"
				}
				mu.Lock()
				results = append(results, result{t0.Sub(start), lat, code})
				mu.Unlock()
				if err != nil {
					time.Sleep(10 * time.Millisecond)
				}
			}
		}(i)
	}
	wg.Wait()

	rep := loadReport{Failures: map[string]int{}, Retried: int(atomic.LoadInt64(&retried))}
	sort.Slice(results, func(i, j int) bool { return results[i].at < results[j].at })
	var lats []float64
	var streakStart time.Duration = -1
	for _, r := range results {
		ms := float64(r.lat.Microseconds()) / 1000
		sec := int(r.at / time.Second)
		for len(rep.Timeline) <= sec {
			rep.Timeline = append(rep.Timeline, second{T: len(rep.Timeline)})
		}
		ts := &rep.Timeline[sec]
		if ms > ts.MaxMs {
			ts.MaxMs = ms
		}
		if ms > rep.MaxMs {
			rep.MaxMs = ms
		}
		lats = append(lats, ms)
		rep.Total++
		if r.code == "OK" {
			rep.OK++
			ts.OK++
			if streakStart >= 0 {
				gap := float64((r.at - streakStart).Microseconds()) / 1000
				if gap > rep.LongestGap {
					rep.LongestGap = gap
				}
				streakStart = -1
			}
			continue
		}
		if r.code == "WRONG_BYTES" {
			rep.Wrong++
		}
		rep.Failures[r.code]++
		if ts.Failed == nil {
			ts.Failed = map[string]int{}
		}
		ts.Failed[r.code]++
		if streakStart < 0 {
			streakStart = r.at
		}
	}
	if streakStart >= 0 && len(results) > 0 {
		gap := float64((results[len(results)-1].at - streakStart).Microseconds()) / 1000
		if gap > rep.LongestGap {
			rep.LongestGap = gap
		}
	}
	sort.Float64s(lats)
	if len(lats) > 0 {
		rep.P50Ms = lats[len(lats)/2]
		rep.P99Ms = lats[len(lats)*99/100]
	}
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
	if rep.Wrong > 0 {
		os.Exit(exitMismatch)
	}
}

// probe: a raw crypto/tls handshake with a deliberately odd client, then
// one gRPC call over that very connection.
func cmdProbe(fs *flag.FlagSet, args []string) {
	tls12 := fs.Bool("tls12only", false, "offer TLS 1.2 at most (with ALPN h2)")
	noalpn := fs.Bool("noalpn", false, "offer no ALPN protocol (TLS 1.3 allowed)")
	c := parseAll(fs, args)
	ep := c.endpoints[0]
	host, _, _ := net.SplitHostPort(ep)
	if c.serverName != "" {
		host = c.serverName
	}
	cfg := &tls.Config{RootCAs: c.roots, ServerName: host, NextProtos: []string{"h2"}}
	if *tls12 {
		cfg.MaxVersion = tls.VersionTLS12
	}
	if *noalpn {
		cfg.NextProtos = nil
	}
	type probeReport struct {
		Handshake bool   `json:"handshake"`
		Version   string `json:"version,omitempty"`
		ALPN      string `json:"alpn"`
		GRPC      bool   `json:"grpc"`
		Code      string `json:"code,omitempty"`
		Error     string `json:"error,omitempty"`
	}
	var rep probeReport
	defer func() {
		out, _ := json.Marshal(rep)
		fmt.Println(string(out))
		if !rep.GRPC {
			os.Exit(2)
		}
	}()
	d := net.Dialer{Timeout: c.timeout}
	raw, err := d.Dial("tcp", ep)
	if err != nil {
		rep.Error = err.Error()
		return
	}
	tc := tls.Client(raw, cfg)
	_ = tc.SetDeadline(time.Now().Add(c.timeout))
	if err := tc.Handshake(); err != nil {
		rep.Error = err.Error()
		tc.Close()
		return
	}
	_ = tc.SetDeadline(time.Time{})
	st := tc.ConnectionState()
	rep.Handshake = true
	rep.ALPN = st.NegotiatedProtocol
	rep.Version = map[uint16]string{tls.VersionTLS12: "TLS1.2", tls.VersionTLS13: "TLS1.3"}[st.Version]

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	used := int32(0)
	conn, err := grpc.DialContext(ctx, "passthrough:///"+ep, grpc.WithInsecure(),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			if atomic.CompareAndSwapInt32(&used, 0, 1) {
				return tc, nil
			}
			return nil, errors.New("probe: one connection only")
		}))
	if err != nil {
		rep.Error = err.Error()
		return
	}
	defer conn.Close()
	var resp frame
	err = conn.Invoke(ctx, methodUnseal, &frame{b: encodeRequest("probe", []byte{0})}, &resp,
		grpc.ForceCodec(rawCodec{}))
	code := status.Code(err)
	rep.Code = code.String()
	// Any status produced by the server (not a transport failure) proves a
	// gRPC exchange happened.
	rep.GRPC = err == nil || (code != codes.Unavailable && code != codes.DeadlineExceeded &&
		code != codes.Canceled && code != codes.Unknown)
	if err != nil && !rep.GRPC {
		rep.Error = err.Error()
	}
}

// Global flags are accepted before and after the command name
// ("talosclient -ca X seal -uuid U" and "talosclient seal -ca X -uuid U").
type globals struct {
	endpoints, caFile, serverName string
	plaintext                     bool
	timeout                       time.Duration
	source                        string
}

var g = globals{endpoints: "127.0.0.1:4050", timeout: 10 * time.Second}

func addGlobals(fs *flag.FlagSet) {
	fs.StringVar(&g.endpoints, "endpoints", g.endpoints, "comma-separated host:port list (pick_first order; grpc:// = plaintext)")
	fs.StringVar(&g.caFile, "ca", g.caFile, "PEM CA bundle to verify the server (default: system roots)")
	fs.BoolVar(&g.plaintext, "plaintext", g.plaintext, "plaintext h2c (Talos grpc:// endpoints)")
	fs.StringVar(&g.serverName, "servername", g.serverName, "TLS server name (default: host of the first endpoint)")
	fs.DurationVar(&g.timeout, "timeout", g.timeout, "deadline per RPC (Talos: 10s)")
	fs.StringVar(&g.source, "source", g.source, "local IP address to connect from (e.g. 127.0.0.2)")
}

func parseAll(fs *flag.FlagSet, args []string) *client {
	addGlobals(fs)
	_ = fs.Parse(args)
	if fs.NArg() > 0 {
		usage(fmt.Sprintf("%s: unexpected argument %q", fs.Name(), fs.Arg(0)))
	}
	eps, plain, err := splitEndpoints(g.endpoints)
	if err != nil {
		usage(err.Error())
	}
	c := &client{endpoints: eps, plaintext: g.plaintext || plain, serverName: g.serverName,
		timeout: g.timeout}
	if g.source != "" {
		if c.source = net.ParseIP(g.source); c.source == nil {
			usage("-source: not an IP address: " + g.source)
		}
	}
	if g.caFile != "" && !c.plaintext {
		pem, err := ioutil.ReadFile(g.caFile)
		if err != nil {
			usage(err.Error())
		}
		c.roots = x509.NewCertPool()
		if !c.roots.AppendCertsFromPEM(pem) {
			usage("no certificate in " + g.caFile)
		}
	}
	return c
}

func main() {
	addGlobals(flag.CommandLine)
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: talosclient [flags] seal|unseal|roundtrip|load|probe [flags]")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 1 {
		flag.Usage()
		os.Exit(exitUsage)
	}
	cmds := map[string]func(*flag.FlagSet, []string){
		"seal": cmdSeal, "unseal": cmdUnseal, "roundtrip": cmdRoundtrip, "load": cmdLoad,
		"probe": cmdProbe, "burst": cmdBurst,
	}
	run, ok := cmds[flag.Arg(0)]
	if !ok {
		usage("unknown command " + flag.Arg(0))
	}
	run(flag.NewFlagSet(flag.Arg(0), flag.ExitOnError), flag.Args()[1:])
}

// cmdBurst makes n calls (unseal of one blob, or seals) with the source
// address rotating over -sources, p at a time, and counts the status codes.
func cmdBurst(fs *flag.FlagSet, args []string) {
	uuid := fs.String("uuid", "", "node UUID")
	uuids := fs.String("uuids", "", "comma-separated node UUIDs to cycle over (overrides -uuid)")
	blob64 := fs.String("blob", "", "sealed blob to unseal (base64)")
	doSeal := fs.Bool("seal", false, "seal random data instead of unsealing")
	n := fs.Int("n", 100, "number of calls")
	sources := fs.String("sources", "", "comma-separated local addresses to rotate over")
	par := fs.Int("parallel", 4, "calls in flight")
	c := parseAll(fs, args)
	blob, err := base64.StdEncoding.DecodeString(*blob64)
	if err != nil || (*blob64 == "" && !*doSeal) {
		usage("burst: -blob (base64) or -seal is required")
	}
	var srcs []net.IP
	for _, s := range strings.Split(*sources, ",") {
		if s = strings.TrimSpace(s); s != "" {
			ip := net.ParseIP(s)
			if ip == nil {
				usage("burst: -sources: not an IP address: " + s)
			}
			srcs = append(srcs, ip)
		}
	}
	ulist := []string{*uuid}
	if *uuids != "" {
		ulist = strings.Split(*uuids, ",")
	}
	var mu sync.Mutex
	codes := map[string]int{}
	var next int64 = -1
	var wg sync.WaitGroup
	t0 := time.Now()
	for w := 0; w < *par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1)
				if i >= int64(*n) {
					return
				}
				cc := *c
				if len(srcs) > 0 {
					cc.source = srcs[int(i)%len(srcs)]
				}
				var err error
				if *doSeal {
					data := make([]byte, 32)
					_, _ = rand.Read(data)
					_, err = cc.seal(cc.endpoints, ulist[int(i)%len(ulist)], data)
				} else {
					_, err = cc.unseal(cc.endpoints, ulist[int(i)%len(ulist)], blob)
				}
				mu.Lock()
				codes[status.Code(err).String()]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	out, _ := json.Marshal(map[string]interface{}{"codes": codes,
		"elapsed_ms": time.Since(t0).Milliseconds()})
	fmt.Println(string(out))
}
