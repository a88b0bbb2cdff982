"""Drive `nomoat chat` through a pseudo-terminal as a person would: two turns (the second must
reuse the KV cache), Ctrl-C in the middle of a long reply (the reply stops, the program does
not), /reset (nothing reused afterwards), /exit. Usage: pty_chat.py PATH_TO_NOMOAT"""
import os, pty, re, select, sys, time

binary = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    os.environ["XDG_RUNTIME_DIR"] = os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    os.execv(binary, [binary, "chat", "--temp", "0", "-n", "300", "-c", "1024"])

buf = b""

def read_until(pattern, timeout=180):
    """Read the terminal until `pattern` (a regex over everything read since the mark) matches."""
    global buf
    deadline = time.time() + timeout
    while True:
        m = re.search(pattern, buf.decode("utf-8", "replace"))
        if m:
            return m
        left = deadline - time.time()
        if left <= 0:
            sys.exit(f"timed out waiting for {pattern!r}; terminal so far:\n{buf.decode('utf-8', 'replace')[-2000:]}")
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                sys.exit(f"nomoat exited while waiting for {pattern!r}:\n{buf.decode('utf-8', 'replace')[-2000:]}")
            buf += chunk

def mark():
    global buf
    buf = b""

def send(s):
    os.write(fd, s.encode())

read_until(r"Chat away")
read_until(r"> ")
mark()
send("What is the capital of France?\n")
m = read_until(r"\[(\d+) prompt tokens \((\d+) reused\).*?(\d+) generated")
assert "Paris" in buf.decode(), buf
print("turn 1:", m.group(0))

mark()
send("And what is the capital of Germany?\n")
m = read_until(r"\[(\d+) prompt tokens \((\d+) reused\).*?(\d+) generated")
reused = int(m.group(2))
assert reused > 20, f"second turn reused only {reused} tokens of the cache"
print("turn 2:", m.group(0))

mark()
send("Write a very long story about a dragon who learns to cook, with many chapters.\n")
read_until(r"chapters\.\r?\n[\s\S]{200,}", timeout=240)  # the reply has begun streaming
send("\x03")
m = read_until(r"\[.*?(\d+) generated.*?, stopped\]")
n = int(m.group(1))
assert n < 300, f"Ctrl-C did not stop the reply ({n} tokens)"
print("interrupted after", n, "tokens")
read_until(r"> ")

mark()
send("/reset\n")
read_until(r"conversation reset")
mark()
send("Hello!\n")
m = read_until(r"\[(\d+) prompt tokens \((\d+) reused\)")
assert int(m.group(2)) == 0, "after /reset nothing should be reused"
print("after reset:", m.group(0))

send("/exit\n")
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("chat session ok")
