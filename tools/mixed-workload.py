#!/usr/bin/env python3
"""Mixed write(2) workload against `ferry lead`, with one streaming `ferry follow`; reports how
long after the writer goes quiet `ferry checksum` of leader and follower become identical.

usage: cargo build --release && tools/mixed-workload.py [SECONDS]   (default 5)
The workload: appends to segments in a few queue dirs, rename-over of a JSON file, truncates,
deletes, and new nested subdirectories, about a thousand operations a second.
"""
import os, random, subprocess, sys, tempfile, time

FERRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "ferry")
seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
work = tempfile.mkdtemp(prefix="ferry-mixed-", dir="/var/tmp")
leader, follower, secret = f"{work}/leader", f"{work}/follower", f"{work}/secret"
os.makedirs(leader)
with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
    f.write("mixed-workload-secret\n")
lead = subprocess.Popen([FERRY, "lead", "--data-dir", leader, "--listen", "127.0.0.1:0",
                         "--secret-file", secret], stderr=subprocess.PIPE, text=True)
addr = None
for line in lead.stderr:
    if "listening on " in line:
        addr = line.rsplit("listening on ", 1)[1].strip()
        break
follow = subprocess.Popen([FERRY, "follow", "--data-dir", follower, "--leader", addr,
                           "--secret-file", secret], stderr=subprocess.DEVNULL)
try:
    random.seed(1)
    end, n = time.time() + seconds, 0
    while time.time() < end:
        n += 1
        op, q = random.random(), f"{leader}/q{random.randint(0, 3)}"
        if op < 0.6:
            os.makedirs(q, exist_ok=True)
            with open(f"{q}/seg{random.randint(0, 5)}", "ab") as f:
                f.write(os.urandom(random.randint(100, 20000)))
        elif op < 0.75:
            with open(f"{leader}/meta.json.tmp", "w") as f:
                f.write('{"n":%d}' % n)
            os.rename(f"{leader}/meta.json.tmp", f"{leader}/meta.json")
        elif op < 0.92 and os.path.isdir(q) and os.listdir(q):
            victim = f"{q}/{random.choice(os.listdir(q))}"
            if op < 0.85:
                with open(victim, "r+b") as f:
                    f.truncate(random.randint(0, 1000))
            else:
                os.remove(victim)
        else:
            os.makedirs(f"{leader}/new{n}/sub", exist_ok=True)
            with open(f"{leader}/new{n}/sub/x", "wb") as f:
                f.write(os.urandom(5000))
        time.sleep(0.001)
    quiet = time.time()

    def checksum(d):
        return subprocess.run([FERRY, "checksum", d], capture_output=True, check=True).stdout

    while checksum(leader) != checksum(follower):
        if time.time() - quiet > 30:
            sys.exit("NOT identical 30 s after the writer went quiet")
        time.sleep(0.01)
    print(f"{n} operations in {seconds:.0f} s; checksums identical "
          f"{time.time() - quiet:.3f} s after the writer went quiet")
finally:
    follow.kill()
    lead.kill()
    subprocess.run(["rm", "-rf", work])
