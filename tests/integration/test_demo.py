"""scripts/demo --check: the demo starts sparkgate with TLS and JWT in
front of the stand-in, a call without a token is refused with 16, and a call
with the demo token goes through with user_id set to the token's subject."""
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness as H  # noqa: E402


class DemoTest(H.SparkgateTestCase):
    def test_demo_check(self):
        d = H.tempdir("sg-demo-")
        # With SPARKGATE_BIN set the demo neither installs nor builds.
        env = dict(os.environ, SPARKGATE_BIN=H.sparkgate_bin())
        proc = subprocess.run(
            ["bash", os.path.join(H.SOURCE_ROOT, "scripts", "demo"), "--check", "--dir", d],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
        out = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, out)
        self.assertIn("Config call without a token refused: UNAUTHENTICATED", out)
        self.assertIn("Config call through sparkgate OK", out)
        self.assertIn("user_id as forwarded: demo-user", out)
        for name in ("ca.pem", "jwt-signing.key", "jwt-signing.pub.pem"):
            self.assertTrue(os.path.exists(os.path.join(d, name)), name)
        with open(os.path.join(d, "check-sparkgate.log"), errors="replace") as f:
            log = f.read()
        self.assertEqual(H.sanitizer_reports(out + log), [])
        self.assertIn("stopped", log)  # it shut down cleanly


if __name__ == "__main__":
    unittest.main()
