// k8sclient is a test client that talks to kmsd-k8s-plugin the way
// kube-apiserver's KMS v2 envelope code does: grpc-go over the plugin's
// unix socket, one long-lived connection, Status before use (version "v2",
// healthz "ok", a non-empty key_id), Encrypt of a fresh 32-byte DEK seed
// with a request uid, and Decrypt with the ciphertext, the key_id Encrypt
// returned and its annotations. It also calls kmsd's cluster API directly
// with a given certificate, to test who kmsd lets in.
//
// Messages are encoded by hand with protowire and a pass-through codec, as
// in talosclient (Debian's grpc-go 1.33 cannot run protoc-gen-go output).
//
// Usage: k8sclient <command> [flags]
//
//	status    -socket S                      prints {"version","healthz","key_id"}
//	envelope  -socket S [-n 1] [-no-status]  Status, then n x (Encrypt seed, Decrypt,
//	                                         compare); prints the last
//	                                         {"key_id","ciphertext","seed"} (base64)
//	decrypt   -socket S -ciphertext B64 -key-id K -expect B64
//	bench     -socket S [-n 1000]            latencies of each call; prints JSON
//	                                         {"status":{"p50_ms","p99_ms"},...}
//	direct    -endpoint H:P -ca F -cert F -key F -method M [-cipher B64 -key-id K]
//	          one call to kmsd's cluster API (M: a full method path)
//
// Exit status: the gRPC status code of the failing RPC (0 = OK), 100 when a
// check failed (wrong bytes, key_id, sizes, healthz), 64 on usage errors.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const (
	exitCheck = 100
	exitUsage = 64
	svc       = "/v2.KeyManagementService/"
	maxCipher = 1024 // kube-apiserver refuses larger ciphertexts
	maxKeyID  = 1024
)

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

// ---- messages -------------------------------------------------------------

func appendBytes(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

// map<string, bytes> entry: {key = 1; value = 2}
func appendMapEntry(b []byte, num protowire.Number, k string, v []byte) []byte {
	var e []byte
	e = appendBytes(e, 1, []byte(k))
	e = appendBytes(e, 2, v)
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, e)
}

// fields of a message: every length-delimited field by number (last wins),
// map entries (field numbers in maps) collected separately.
type msg struct {
	f    map[protowire.Number][]byte
	maps map[protowire.Number]map[string][]byte
}

func decode(b []byte, mapFields ...protowire.Number) (msg, error) {
	m := msg{f: map[protowire.Number][]byte{}, maps: map[protowire.Number]map[string][]byte{}}
	isMap := map[protowire.Number]bool{}
	for _, n := range mapFields {
		isMap[n] = true
		m.maps[n] = map[string][]byte{}
	}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return m, protowire.ParseError(n)
		}
		b = b[n:]
		if typ == protowire.BytesType {
			v, k := protowire.ConsumeBytes(b)
			if k < 0 {
				return m, protowire.ParseError(k)
			}
			b = b[k:]
			if isMap[num] {
				e, err := decode(v)
				if err != nil {
					return m, err
				}
				m.maps[num][string(e.f[1])] = e.f[2]
			} else {
				m.f[num] = append([]byte(nil), v...)
			}
			continue
		}
		k := protowire.ConsumeFieldValue(num, typ, b)
		if k < 0 {
			return m, protowire.ParseError(k)
		}
		b = b[k:]
	}
	return m, nil
}

// ---- the plugin side --------------------------------------------------------

type plugin struct {
	conn    *grpc.ClientConn
	timeout time.Duration
}

func dialPlugin(socket string, timeout time.Duration) *plugin {
	path := strings.TrimPrefix(strings.TrimPrefix(socket, "unix://"), "unix:")
	conn, err := grpc.Dial("unix://"+path, grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}))
	if err != nil {
		fail(err)
	}
	return &plugin{conn: conn, timeout: timeout}
}

func (p *plugin) invoke(method string, req []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout)
	defer cancel()
	var resp frame
	err := p.conn.Invoke(ctx, svc+method, &frame{b: req}, &resp, grpc.ForceCodec(rawCodec{}))
	return resp.b, err
}

type statusResp struct {
	Version string `json:"version"`
	Healthz string `json:"healthz"`
	KeyID   string `json:"key_id"`
}

func (p *plugin) status() (statusResp, error) {
	b, err := p.invoke("Status", nil)
	if err != nil {
		return statusResp{}, err
	}
	m, err := decode(b)
	if err != nil {
		return statusResp{}, err
	}
	return statusResp{string(m.f[1]), string(m.f[2]), string(m.f[3])}, nil
}

func (p *plugin) encrypt(pt []byte, uid string) (ct []byte, keyID string, ann map[string][]byte, err error) {
	var req []byte
	req = appendBytes(req, 1, pt)
	req = appendBytes(req, 2, []byte(uid))
	b, err := p.invoke("Encrypt", req)
	if err != nil {
		return nil, "", nil, err
	}
	m, err := decode(b, 3)
	if err != nil {
		return nil, "", nil, err
	}
	return m.f[1], string(m.f[2]), m.maps[3], nil
}

func (p *plugin) decrypt(ct []byte, uid, keyID string, ann map[string][]byte) ([]byte, error) {
	var req []byte
	req = appendBytes(req, 1, ct)
	req = appendBytes(req, 2, []byte(uid))
	req = appendBytes(req, 3, []byte(keyID))
	keys := make([]string, 0, len(ann))
	for k := range ann {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		req = appendMapEntry(req, 4, k, ann[k])
	}
	b, err := p.invoke("Decrypt", req)
	if err != nil {
		return nil, err
	}
	m, err := decode(b)
	if err != nil {
		return nil, err
	}
	return m.f[1], nil
}

// ---- helpers --------------------------------------------------------------

func fail(err error) {
	st := status.Convert(err)
	fmt.Fprintf(os.Stderr, "k8sclient: %s: %s\n", st.Code(), st.Message())
	os.Exit(int(st.Code()))
}

func checkFail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "k8sclient: check failed: "+format+"\n", a...)
	os.Exit(exitCheck)
}

func usage(msg string) {
	fmt.Fprintln(os.Stderr, "k8sclient: "+msg)
	os.Exit(exitUsage)
}

func printJSON(v interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func uid() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("uid-%x", b)
}

// what kube-apiserver checks on a Status answer before it uses the plugin
func checkStatus(s statusResp) {
	if s.Version != "v2" {
		checkFail("status version %q, want v2", s.Version)
	}
	if s.Healthz != "ok" {
		checkFail("status healthz %q, want ok", s.Healthz)
	}
	if s.KeyID == "" || len(s.KeyID) > maxKeyID {
		checkFail("status key_id %q empty or longer than %d", s.KeyID, maxKeyID)
	}
}

// ---- commands -------------------------------------------------------------

func cmdStatus(fs *flag.FlagSet, args []string) {
	socket := fs.String("socket", "", "plugin socket")
	timeout := fs.Duration("timeout", 3*time.Second, "per call (kube-apiserver: 3s)")
	_ = fs.Parse(args)
	p := dialPlugin(*socket, *timeout)
	s, err := p.status()
	if err != nil {
		fail(err)
	}
	printJSON(s)
}

func cmdEnvelope(fs *flag.FlagSet, args []string) {
	socket := fs.String("socket", "", "plugin socket")
	n := fs.Int("n", 1, "seeds to encrypt and decrypt")
	timeout := fs.Duration("timeout", 3*time.Second, "per call")
	noStatus := fs.Bool("no-status", false, "skip the Status check (kube-apiserver polls "+
		"Status on its own schedule, not before each call)")
	_ = fs.Parse(args)
	p := dialPlugin(*socket, *timeout)
	var s statusResp
	var err error
	if !*noStatus {
		if s, err = p.status(); err != nil {
			fail(err)
		}
		checkStatus(s)
	}
	var last map[string]string
	for i := 0; i < *n; i++ {
		seed := make([]byte, 32)
		_, _ = rand.Read(seed)
		ct, keyID, ann, err := p.encrypt(seed, uid())
		if err != nil {
			fail(err)
		}
		if len(ct) == 0 || len(ct) > maxCipher {
			checkFail("ciphertext of %d bytes (1..%d)", len(ct), maxCipher)
		}
		if keyID != s.KeyID && !*noStatus {
			// kube-apiserver re-reads Status when Encrypt reports another key
			if s, err = p.status(); err != nil {
				fail(err)
			}
			if keyID != s.KeyID && !*noStatus {
				checkFail("Encrypt key_id %q differs from Status key_id %q", keyID, s.KeyID)
			}
		}
		pt, err := p.decrypt(ct, uid(), keyID, ann)
		if err != nil {
			fail(err)
		}
		if string(pt) != string(seed) {
			checkFail("decrypted seed differs")
		}
		last = map[string]string{"key_id": keyID,
			"ciphertext": base64.StdEncoding.EncodeToString(ct),
			"seed":       base64.StdEncoding.EncodeToString(seed),
			"ciphertext_len": fmt.Sprint(len(ct))}
	}
	printJSON(last)
}

func cmdDecrypt(fs *flag.FlagSet, args []string) {
	socket := fs.String("socket", "", "plugin socket")
	ct64 := fs.String("ciphertext", "", "base64")
	keyID := fs.String("key-id", "", "key_id Encrypt returned")
	expect := fs.String("expect", "", "base64 of the expected plaintext")
	timeout := fs.Duration("timeout", 3*time.Second, "per call")
	_ = fs.Parse(args)
	ct, err1 := base64.StdEncoding.DecodeString(*ct64)
	want, err2 := base64.StdEncoding.DecodeString(*expect)
	if err1 != nil || err2 != nil {
		usage("bad base64")
	}
	p := dialPlugin(*socket, *timeout)
	pt, err := p.decrypt(ct, uid(), *keyID, nil)
	if err != nil {
		fail(err)
	}
	if string(pt) != string(want) {
		checkFail("decrypted seed differs")
	}
	fmt.Println("ok")
}

func percentiles(d []time.Duration) map[string]float64 {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	at := func(q float64) float64 {
		i := int(q * float64(len(d)-1))
		return float64(d[i].Microseconds()) / 1000
	}
	return map[string]float64{"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1)}
}

func cmdBench(fs *flag.FlagSet, args []string) {
	socket := fs.String("socket", "", "plugin socket")
	n := fs.Int("n", 1000, "calls of each kind")
	timeout := fs.Duration("timeout", 3*time.Second, "per call")
	_ = fs.Parse(args)
	if *n < 1 {
		usage("-n must be >= 1")
	}
	p := dialPlugin(*socket, *timeout)
	var st, en, de []time.Duration
	seed := make([]byte, 32)
	for i := 0; i < *n; i++ {
		t0 := time.Now()
		s, err := p.status()
		if err != nil {
			fail(err)
		}
		st = append(st, time.Since(t0))
		checkStatus(s)
		_, _ = rand.Read(seed)
		t0 = time.Now()
		ct, keyID, ann, err := p.encrypt(seed, uid())
		if err != nil {
			fail(err)
		}
		en = append(en, time.Since(t0))
		t0 = time.Now()
		pt, err := p.decrypt(ct, uid(), keyID, ann)
		if err != nil {
			fail(err)
		}
		de = append(de, time.Since(t0))
		if string(pt) != string(seed) {
			checkFail("decrypted seed differs")
		}
	}
	printJSON(map[string]interface{}{"n": *n, "status": percentiles(st),
		"encrypt": percentiles(en), "decrypt": percentiles(de)})
}

// cmdDirect calls kmsd's cluster API with the given client certificate.
func cmdDirect(fs *flag.FlagSet, args []string) {
	endpoint := fs.String("endpoint", "", "kmsd cluster API host:port")
	ca := fs.String("ca", "", "CA of kmsd's node certificates")
	cert := fs.String("cert", "", "client certificate")
	key := fs.String("key", "", "client key")
	method := fs.String("method", "/kmsd.v1.KubernetesKms/Status", "full method path")
	pt64 := fs.String("plaintext", "", "base64 (Encrypt): field 1 of the request")
	timeout := fs.Duration("timeout", 5*time.Second, "per call")
	_ = fs.Parse(args)
	pem, err := ioutil.ReadFile(*ca)
	if err != nil {
		usage(err.Error())
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		usage("no certificate in " + *ca)
	}
	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		usage(err.Error())
	}
	host, _, err := net.SplitHostPort(*endpoint)
	if err != nil {
		usage(err.Error())
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: host,
		Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13})
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *endpoint, grpc.WithTransportCredentials(creds))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	var req []byte
	if *pt64 != "" {
		pt, err := base64.StdEncoding.DecodeString(*pt64)
		if err != nil {
			usage("bad base64")
		}
		req = appendBytes(req, 1, pt)
	}
	var resp frame
	if err := conn.Invoke(ctx, *method, &frame{b: req}, &resp, grpc.ForceCodec(rawCodec{})); err != nil {
		fail(err)
	}
	fmt.Println("ok")
}

func main() {
	if len(os.Args) < 2 {
		usage("usage: k8sclient status|envelope|decrypt|bench|direct [flags]")
	}
	cmds := map[string]func(*flag.FlagSet, []string){
		"status": cmdStatus, "envelope": cmdEnvelope, "decrypt": cmdDecrypt,
		"bench": cmdBench, "direct": cmdDirect,
	}
	run, ok := cmds[os.Args[1]]
	if !ok {
		usage("unknown command " + os.Args[1])
	}
	run(flag.NewFlagSet(os.Args[1], flag.ExitOnError), os.Args[2:])
}
