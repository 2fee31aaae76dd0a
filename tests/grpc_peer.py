"""A real gRPC peer (grpcio) for the trailer tests: `serve` prints its port and serves a
unary and a server-streaming method that both set trailing metadata; `call TARGET` calls
both through the proxy and checks payloads, status and trailers."""
import sys
from concurrent import futures

import grpc


def reverse(request, context):
    context.set_trailing_metadata((("x-trailer", "unary"),))
    return request[::-1]


def count(request, context):
    context.set_trailing_metadata((("x-trailer", "stream"),))
    for i in range(5):
        yield request + str(i).encode()


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Reverse": grpc.unary_unary_rpc_method_handler(reverse),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination(timeout=120)


def call(target):
    with grpc.insecure_channel(target) as channel:
        reply, c = channel.unary_unary("/test.Echo/Reverse").with_call(b"hello", timeout=10)
        assert reply == b"olleh", reply
        assert c.code() == grpc.StatusCode.OK, c.code()
        assert ("x-trailer", "unary") in c.trailing_metadata(), c.trailing_metadata()
        it = channel.unary_stream("/test.Echo/Count")(b"n", timeout=10)
        items = list(it)
        assert items == [b"n0", b"n1", b"n2", b"n3", b"n4"], items
        assert it.code() == grpc.StatusCode.OK, it.code()
        assert ("x-trailer", "stream") in it.trailing_metadata(), it.trailing_metadata()
    print("ok", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        call(sys.argv[2])
