//! `nomoat chat` driven through a pseudo-terminal (tests/chat/pty_chat.py): two turns with KV
//! reuse, Ctrl-C mid-reply, /reset, /exit.

#[test]
fn interactive_chat_session() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/chat/pty_chat.py");
    let out = std::process::Command::new("python3").arg(script).arg(env!("CARGO_BIN_EXE_nomoat")).output().expect("python3 is needed to drive the pseudo-terminal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("chat session ok"), "pty chat session failed");
}
