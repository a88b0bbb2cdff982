// Token t's position, and the cache row its sequence's position 0 sits at: consecutive
// positions from p.pos0 of one sequence, or under SEQ_ROWS (a decode step of several
// sequences, two to a vec4 of p.seqs) each token its own. Needs p.pos0 and p.kv_row0, and
// p.seqs with SEQ_ROWS.
fn seq_place(t: u32) -> vec2<u32> {
#if SEQ_ROWS
    let pair = p.seqs[t / 2u];
    return select(pair.xy, pair.zw, t % 2u == 1u);
#else
    return vec2<u32>(p.pos0 + t, p.kv_row0);
#endif
}
