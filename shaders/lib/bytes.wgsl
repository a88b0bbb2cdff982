// Reading GGUF blocks as stored. Blocks are 18, 34, 210... bytes long, so their fields sit at any
// byte offset; storage buffers are only addressable in 32-bit words. These helpers read bytes out
// of the words of `src_q`, which the including kernel declares. Every block size is even, so a
// block's f16 fields never straddle two words; `ld_u32` may, and the buffer carries 16 spare bytes
// so its second word read stays in bounds at the very end.
#include "lib/unpack.wgsl"

fn ld_u8(b: u32) -> u32 {
    return (src_q[b >> 2u] >> ((b & 3u) * 8u)) & 0xFFu;
}

// b must be even
fn ld_u16(b: u32) -> u32 {
    return (src_q[b >> 2u] >> ((b & 2u) * 8u)) & 0xFFFFu;
}

fn ld_u32(b: u32) -> u32 {
    let s = (b & 3u) * 8u;
    let w = src_q[b >> 2u];
    if (s == 0u) {
        return w;
    }
    return (w >> s) | (src_q[(b >> 2u) + 1u] << (32u - s));
}

fn ld_f16(b: u32) -> f32 {
    return unpack2x16float(ld_u16(b)).x;
}
