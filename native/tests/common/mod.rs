//! What the server tests share: starting `nomoat serve` and learning its address from its log.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Runs `cmd` (a `nomoat serve` with stderr piped) and waits up to 5 minutes for it to say
/// where it listens; its stderr is collected in the returned log. Panics with the log if it
/// never does.
pub fn spawn_listening(mut cmd: Command) -> (Child, String, Arc<Mutex<String>>) {
    let mut child = cmd.spawn().expect("starting nomoat serve");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(addr) => (child, addr, log),
        Err(_) => {
            let _ = child.kill();
            panic!("nomoat serve did not start listening; its log:\n{}", log.lock().unwrap());
        }
    }
}
