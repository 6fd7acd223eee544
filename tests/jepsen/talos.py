"""A Talos-like sidero.kms.KMSService client in Python (grpcio, /usr/bin/python3).

Like Talos's grpc-go client: a NEW channel (TCP + TLS handshake) per RPC, a
local subchannel pool (no connection sharing between RPCs), every endpoint
given to one channel with pick_first, so a refused connection fails over to
the next address, and a 10 s deadline. Messages are encoded by hand:
Request{string node_uuid = 1; bytes data = 2;}, Response{bytes data = 1;}.
"""
import grpc

SEAL = "/sidero.kms.KMSService/Seal"
UNSEAL = "/sidero.kms.KMSService/Unseal"

# Definite application answers: observations, not failures.
DEFINITE = {"NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
            "ALREADY_EXISTS", "RESOURCE_EXHAUSTED"}


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_request(uuid, data):
    u = uuid.encode()
    return b"\x0a" + _varint(len(u)) + u + b"\x12" + _varint(len(data)) + data


def decode_response(b):
    i, out = 0, b""
    while i < len(b):
        tag = b[i]
        i += 1
        wt = tag & 7
        if wt == 2:
            ln, sh = 0, 0
            while True:
                c = b[i]
                i += 1
                ln |= (c & 0x7F) << sh
                sh += 7
                if not c & 0x80:
                    break
            if tag >> 3 == 1:
                out = b[i:i + ln]
            i += ln
        elif wt == 0:
            while b[i] & 0x80:
                i += 1
            i += 1
        else:
            raise ValueError("unexpected wire type")
    return out


class Talos:
    def __init__(self, ca_file, timeout=10.0):
        with open(ca_file, "rb") as f:
            self.creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        self.timeout = timeout

    def call(self, endpoints, method, uuid, data, timeout=None):
        """Returns (status, payload, detail): status 'OK' or a gRPC code name."""
        target = "ipv4:" + ",".join(endpoints)
        opts = [("grpc.ssl_target_name_override", "localhost"),
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.enable_retries", 0),
                ("grpc.enable_http_proxy", 0),
                ("grpc.lb_policy_name", "pick_first")]
        ch = grpc.secure_channel(target, self.creds, options=opts)
        try:
            fn = ch.unary_unary(method)
            out = fn(encode_request(uuid, data), timeout=timeout or self.timeout)
            return "OK", decode_response(out), ""
        except grpc.RpcError as e:
            return e.code().name, None, (e.details() or "")[:200]
        finally:
            ch.close()


def connect_failed(code, detail):
    """True when the RPC certainly never reached a server (all connects refused)."""
    d = detail.lower()
    return code == "UNAVAILABLE" and ("failed to connect" in d or "connection refused" in d
                                      or "connect failed" in d)
