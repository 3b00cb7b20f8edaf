"""Our changes to the pinned llama.cpp. This one: `ggml-rpc-server` copies cache hits in the background.

A warm load (every big weight already in the worker's `-c` cache) is two byte-serial loops
taking turns: llama-server computes a tensor's FNV-1a hash, then waits while the rpc-server
reads the cache entry into a zeroed buffer and copies it into the tensor, then hashes the next
one. On loopback the waiting is about 40% of the load. The change answers a hit as soon as the
entry is found, copies it on a thread while the client hashes its next tensor, and reads
straight into host memory. Every later command waits for the copy first, so nothing can use a
tensor before its bytes are in place; an entry that cannot be read in full closes the
connection rather than leave a tensor half written.

Nothing on the wire or on disk changes: the cache names, the protocol and the client are the
engine's own, so a mesh can mix these workers with stock ones. A tree the change does not fit
(another llama.cpp named by SHAREDLLM_LLAMA_SDIST) is built unchanged.
"""

from __future__ import annotations

from pathlib import Path

from .patch_edits import Edit, EnginePatch, apply_patch
from .sealed_patch import SEALED_PATCH

PATCH_NAME = "rpc-cache-overlap"
_FILE = "ggml/src/ggml-rpc/ggml-rpc.cpp"

_MEMBERS = Edit(
    old="""private:
    bool get_cached_file(uint64_t hash, std::vector<uint8_t> & data);
""",
    new="""    // sharedllm: waits for a cache hit's background copy; false if it could not finish
    bool finish_cached_copy();

private:
    bool get_cached_file(uint64_t hash, std::vector<uint8_t> & data);
    std::thread cached_copy;
    bool cached_copy_ok = true;  // written by the copy thread, read after joining it
""",
)

_SET_TENSOR_HASH = Edit(
    old="""bool rpc_server::set_tensor_hash(const rpc_msg_set_tensor_hash_req & request, rpc_msg_set_tensor_hash_rsp & response)
{
    std::vector<uint8_t> cached_file;
    if (!get_cached_file(request.hash, cached_file)) {
        response.result = 0;
        return true;
    }
    size_t size = cached_file.size();
""",
    new="""bool rpc_server::finish_cached_copy() {
    if (cached_copy.joinable()) {
        cached_copy.join();
    }
    const bool ok = cached_copy_ok;
    cached_copy_ok = true;
    return ok;
}

// sharedllm: reads a cache entry into a tensor, straight into it when it lives in host memory
static bool copy_cached_file(const fs::path & path, ggml_tensor * tensor, uint64_t offset, size_t size) {
    std::ifstream ifs(path, std::ios::binary);
    if (ggml_backend_buffer_is_host(tensor->buffer)) {
        ifs.read((char *) tensor->data + offset, (std::streamsize) size);
        return ifs && (size_t) ifs.gcount() == size;
    }
    std::vector<uint8_t> data(size);
    ifs.read((char *) data.data(), (std::streamsize) size);
    if (!ifs || (size_t) ifs.gcount() != size) {
        return false;
    }
    ggml_backend_tensor_set(tensor, data.data(), offset, size);
    return true;
}

bool rpc_server::set_tensor_hash(const rpc_msg_set_tensor_hash_req & request, rpc_msg_set_tensor_hash_rsp & response)
{
    // sharedllm: a hit is answered once the entry is found; its bytes are copied on a thread
    // while the client hashes its next tensor, and the next command waits for the copy
    response.result = 0;
    if (!cache_dir) {
        return true;
    }
    char hash_str[17];
    snprintf(hash_str, sizeof(hash_str), "%016" PRIx64, request.hash);
    const fs::path cache_file = fs::path(cache_dir) / hash_str;
    std::error_code ec;
    const uintmax_t file_size = fs::file_size(cache_file, ec);
    if (ec) {
        return true;
    }
    size_t size = (size_t) file_size;
""",
)

_HIT = Edit(
    old="""    ggml_backend_tensor_set(tensor, cached_file.data(), request.offset, size);
    response.result = 1;
    return true;
}
""",
    new="""    if (request.offset + size > ggml_nbytes(tensor)) {
        GGML_LOG_ERROR("[%s] cache entry %s is larger than its tensor\\n", __func__, hash_str);
        return false;
    }
    const uint64_t offset = request.offset;
    cached_copy = std::thread([this, ctx = std::move(ctx_ptr), tensor, cache_file, offset, size]() {
        cached_copy_ok = copy_cached_file(cache_file, tensor, offset, size);
    });
    response.result = 1;
    return true;
}
""",
)

_DESTRUCTOR = Edit(
    old="""rpc_server::~rpc_server() {
""",
    new="""rpc_server::~rpc_server() {
    finish_cached_copy();  // sharedllm: never free a buffer that a copy still writes to
""",
)

_LOOP = Edit(
    old="""        if (!sock->recv_data(&cmd, 1)) {
            break;
        }
""",
    new="""        if (!sock->recv_data(&cmd, 1)) {
            break;
        }
        if (!server.finish_cached_copy()) {
            GGML_LOG_ERROR("a cached tensor could not be read in full; closing the connection\\n");
            break;
        }
""",
)

EDITS = (_MEMBERS, _SET_TENSOR_HASH, _HIT, _DESTRUCTOR, _LOOP)


CACHE_PATCH = EnginePatch(name=PATCH_NAME, edits={_FILE: EDITS})
ENGINE_PATCHES = (CACHE_PATCH, SEALED_PATCH)


def apply_engine_patch(tree: Path) -> str | None:
    """Applies the cache-hit change to a llama.cpp source tree; returns why not where it does
    not fit (the tree is then left as it was)."""
    return apply_patch(tree, CACHE_PATCH)
