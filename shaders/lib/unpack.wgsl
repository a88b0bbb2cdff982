// Unpacking the bytes of a u32 (no buffer access, so any kernel can include it).

// the four bytes of w as signed integers, lowest byte first
fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(i32(w << 24u), i32(w << 16u), i32(w << 8u), i32(w)) >> vec4<u32>(24u));
}

// the four bytes of w as unsigned integers, lowest byte first
fn u8x4(w: u32) -> vec4<u32> {
    return vec4<u32>(w & 0xFFu, (w >> 8u) & 0xFFu, (w >> 16u) & 0xFFu, w >> 24u);
}
