"""Our second change to the pinned llama.cpp: the RPC transport seals a tunnel's records itself.

Through the node's relay, every message of a token crosses two more loopback connections and
wakes a relay thread on each node (about 0.25 ms a round trip on the GPU machine: 0.5 ms of
every token of a two-worker split). With this change, once the node has authenticated a
tunnel and agreed on its keys as always, it hands the engine the tunnel's TCP connection over a
private Unix socket (`SHAREDLLM_RPC_HANDOFF`), and llama-server and ggml-rpc-server seal and
open the very records the relay would (mesh/transport/sealed_records.h). The wire does not
change, so either end may be a relay or an engine. The engine opens libcrypto at run time
(`SHAREDLLM_LIBCRYPTO`), as it is built without it; without the variables, or where a handoff
fails, it speaks plain TCP to the node's loopback tunnel as before. Linux only.
"""

from __future__ import annotations

from pathlib import Path

from ...mesh.transport.native_relay import SEALED_RECORDS
from .patch_edits import Edit, EnginePatch

SEALED_PATCH_NAME = "sealed-handoff"
_TRANSPORT = "ggml/src/ggml-rpc/transport.cpp"
_CMAKE = "ggml/src/ggml-rpc/CMakeLists.txt"
_GUARD_OPEN = "#ifdef __linux__\n"
_GUARD_CLOSE = "#endif\n"

_INCLUDE = Edit(
    old="#include <optional>\n",
    new='#include <optional>\n\n#include "sharedllm_sealed_transport.inc"\n',
)

_MEMBERS = Edit(
    old="""    bool     use_rdma;
    sockfd_t fd;
};
""",
    new=f"""    bool     use_rdma;
    sockfd_t fd;
{_GUARD_OPEN}    std::unique_ptr<sharedllm_link> sealed;  // sharedllm: records sealed here
    int handoff = -1;                        // sharedllm: a server's handoff listener
{_GUARD_CLOSE}}};
""",
)

_DESTRUCTOR = Edit(
    old="socket_t::impl::~impl() {\n",
    new=f"""socket_t::impl::~impl() {{
{_GUARD_OPEN}    if (sealed) sharedllm_close(*sealed, fd);
    if (handoff >= 0) close(handoff);
{_GUARD_CLOSE}""",
)


def _hook(signature: str, body: str) -> Edit:
    """Runs `body` first in the function `signature` opens."""
    return Edit(old=signature, new=f"{signature}{_GUARD_OPEN}{body}{_GUARD_CLOSE}")


_SEND = _hook(
    "bool socket_t::impl::send_data(const void * data, size_t size) {\n",
    "    if (sealed) return sharedllm_send(*sealed, fd, data, size);\n",
)
_RECV = _hook(
    "bool socket_t::impl::recv_data(void * data, size_t size) {\n",
    "    if (sealed) return sharedllm_recv(*sealed, fd, data, size);\n",
)
_FLUSH = _hook(
    "bool socket_t::impl::flush() {\n",
    "    if (sealed) return sharedllm_flush(*sealed, fd);\n",
)
_CAPS = Edit(  # a sealed tunnel never upgrades to a transport that would bypass the seal
    old="    memset(local_caps, 0, RPC_CONN_CAPS_SIZE);\n",
    new=f"    memset(local_caps, 0, RPC_CONN_CAPS_SIZE);\n{_GUARD_OPEN}    if (sealed) return;\n"
    f"{_GUARD_CLOSE}",
)
_ACCEPT = _hook(
    "socket_ptr socket_t::accept() {\n",
    """    while (pimpl->handoff >= 0) {
        pollfd ready[2] = {{pimpl->fd, POLLIN, 0}, {pimpl->handoff, POLLIN, 0}};
        if (poll(ready, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return nullptr;
        }
        if (ready[0].revents) break;  // a TCP client, accepted as before
        auto link = std::make_unique<sharedllm_link>();
        int handed = sharedllm_accept(pimpl->handoff, *link);
        if (handed >= 0) {
            auto handed_impl = std::make_unique<impl>(handed);
            handed_impl->sealed = std::move(link);
            return socket_ptr(new socket_t(std::move(handed_impl)));
        }
    }
""",
)
_LISTEN = Edit(
    old="""    if (listen(sockfd, 1) < 0) {
        return nullptr;
    }
    return socket_ptr(new socket_t(std::make_unique<impl>(sockfd)));
""",
    new=f"""    if (listen(sockfd, 1) < 0) {{
        return nullptr;
    }}
    auto server = std::make_unique<impl>(sockfd);
{_GUARD_OPEN}    server->handoff = sharedllm_listen();
{_GUARD_CLOSE}    return socket_ptr(new socket_t(std::move(server)));
""",
)
_CONNECT = _hook(
    "socket_ptr socket_t::connect(const char * host, int port) {\n",
    """    auto link = std::make_unique<sharedllm_link>();
    int handed = sharedllm_ask(host, port, *link);
    if (handed >= 0) {
        auto handed_impl = std::make_unique<impl>(handed);
        handed_impl->sealed = std::move(link);
        return socket_ptr(new socket_t(std::move(handed_impl)));
    }
""",
)
_LINK_DL = Edit(
    old="""if (WIN32)
    target_link_libraries(ggml-rpc PRIVATE ws2_32)
endif()
""",
    new="""if (WIN32)
    target_link_libraries(ggml-rpc PRIVATE ws2_32)
else()
    target_link_libraries(ggml-rpc PRIVATE ${CMAKE_DL_LIBS})  # sharedllm: libcrypto at run time
endif()
""",
)

SEALED_PATCH = EnginePatch(
    name=SEALED_PATCH_NAME,
    edits={
        _TRANSPORT: (
            _INCLUDE,
            _MEMBERS,
            _DESTRUCTOR,
            _SEND,
            _RECV,
            _FLUSH,
            _CAPS,
            _ACCEPT,
            _LISTEN,
            _CONNECT,
        ),
        _CMAKE: (_LINK_DL,),
    },
    added={
        "ggml/src/ggml-rpc/sharedllm_sealed_transport.inc": Path(__file__).with_name(
            "sealed_transport.inc"
        ),
        "ggml/src/ggml-rpc/sharedllm_sealed_records.h": SEALED_RECORDS,
    },
)
