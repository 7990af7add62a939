"""Tests of streaming_anomaly_service (standard library only).

Run by tests/python_service.rs, or by hand:
    FAD_BIN=target/debug/fad FAD_TEST_MODEL=artifacts python3 python/test_streaming_anomaly_service.py
FAD_TEST_MODEL is a model whose features need 24 samples (SPEC section 2 window features).
"""

import gc
import os
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from streaming_anomaly_service import AnomalyService, FadError  # noqa: E402

FAD = os.environ.get("FAD_BIN", "fad")
MODEL = os.environ.get("FAD_TEST_MODEL", "artifacts")


def messages(n, group="g1", seq="s1", t0=0):
    return [f"{t},{130 + t % 7},{10 + t % 5},{group},{seq}" for t in range(t0, t0 + n)]


def fad_stream(lines):
    """What `fad stream` itself answers to these lines."""
    out = subprocess.run(
        [FAD, "stream", "--model", MODEL],
        input="".join(line + "\n" for line in lines).encode(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return out.stdout.decode().splitlines()


def gone(pid, patience=10.0):
    """True once no process has this id (waiting up to `patience` seconds)."""
    end = time.monotonic() + patience
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie still answers kill(0): it is gone once its parent reaped it
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return False
        except OSError:
            return True
        time.sleep(0.05)
    return False


class ServiceTest(unittest.TestCase):
    def test_each_message_gets_the_reply_fad_stream_gives(self):
        lines = messages(30)
        with AnomalyService(MODEL, fad_path=FAD) as svc:
            replies = [svc.process_message(m) for m in lines]
        self.assertEqual(replies, fad_stream(lines))
        self.assertEqual(replies[0], "ready:false,detection:,needed:23")
        self.assertTrue(replies[23].startswith("ready:true,detection:23,"), replies[23])
        self.assertTrue(replies[23].endswith(",needed:0"))

    def test_a_line_end_and_a_mapping_are_fine(self):
        with AnomalyService(MODEL, fad_path=FAD) as svc:
            self.assertEqual(svc.process_message("0,140,10,g,s\n"), "ready:false,detection:,needed:23")
            msg = {"timestamp": 1, "bpm": 141.5, "uterus": 11, "group_id": "g", "sequence_id": "s"}
            self.assertEqual(svc.process_message(msg), "ready:false,detection:,needed:22")
            self.assertEqual(svc.process_message(b"2,140,10,g,s\r\n"), "ready:false,detection:,needed:21")

    def test_a_malformed_message_gets_an_error_and_the_next_still_works(self):
        with AnomalyService(MODEL, fad_path=FAD) as svc:
            self.assertEqual(svc.process_message("0,140,10,g,s"), "ready:false,detection:,needed:23")
            self.assertEqual(
                svc.process_message("garbage"), "ready:false,detection:,needed:24,error:wrong_field_count"
            )
            self.assertEqual(svc.process_message("1,abc,10,g,s"), "ready:false,detection:,needed:23,error:bad_bpm")
            self.assertEqual(svc.process_message("1,140,10,g,s"), "ready:false,detection:,needed:22")

    def test_a_line_break_inside_a_message_is_one_error_reply(self):
        with AnomalyService(MODEL, fad_path=FAD) as svc:
            self.assertEqual(svc.process_message("0,140,10,g,s"), "ready:false,detection:,needed:23")
            reply = svc.process_message("1,14\n0,10,g,s")
            self.assertEqual(reply, "ready:false,detection:,needed:23,error:bad_bpm")
            reply = svc.process_message("1,140,10,g\r\n,s")
            self.assertTrue(reply.startswith("ready:false,detection:,needed:"), reply)
            self.assertIn(",error:", reply)
            # still in step: the next message gets its own reply
            self.assertEqual(svc.process_message("1,140,10,g,s"), "ready:false,detection:,needed:22")

    def test_text_that_is_not_utf8_is_an_error_reply_not_a_dead_service(self):
        with AnomalyService(MODEL, fad_path=FAD) as svc:
            pid = svc._proc.pid
            self.assertEqual(svc.process_message("0,140,10,g,s"), "ready:false,detection:,needed:23")
            # a lone surrogate cannot be UTF-8; invalid bytes are not either
            for msg in ("1,140,10,g\ud800,s", b"1,140,\xff,g,s"):
                self.assertEqual(svc.process_message(msg), "ready:false,detection:,needed:24,error:not_utf8")
            self.assertEqual(svc.process_message(b"1,140,10,g,s"), "ready:false,detection:,needed:22")
            self.assertEqual(svc._proc.pid, pid)
            self.assertIsNone(svc._proc.poll(), "the co-process is still alive")

    def test_close_ends_the_co_process(self):
        svc = AnomalyService(MODEL, fad_path=FAD)
        pid = svc.pid
        svc.process_message("0,140,10,g,s")
        svc.close()
        self.assertTrue(gone(pid))
        svc.close()  # idempotent
        with self.assertRaises(FadError):
            svc.process_message("1,140,10,g,s")

    def test_garbage_collection_ends_the_co_process(self):
        svc = AnomalyService(MODEL, fad_path=FAD)
        pid = svc.pid
        svc.process_message("0,140,10,g,s")
        del svc
        gc.collect()
        self.assertTrue(gone(pid))

    def test_a_dead_co_process_is_a_clear_error(self):
        svc = AnomalyService(MODEL, fad_path=FAD)
        os.kill(svc.pid, signal.SIGKILL)
        with self.assertRaises(FadError) as cm:
            svc.process_message("0,140,10,g,s")
        self.assertIn("ended with exit status", str(cm.exception))
        with self.assertRaises(FadError):
            svc.process_message("1,140,10,g,s")
        svc.close()

    def test_a_model_that_does_not_load_fails_at_once_with_fads_message(self):
        with self.assertRaises(FadError) as cm:
            AnomalyService(os.path.join(MODEL, "no-such-dir"), fad_path=FAD)
        self.assertIn("ended with exit status 1: fad: cannot read model metadata", str(cm.exception))

    def test_a_bad_extra_argument_is_named_not_lost_behind_the_usage_text(self):
        with self.assertRaises(FadError) as cm:
            AnomalyService(MODEL, fad_path=FAD, extra_args=["--horizn", "3"])
        said = str(cm.exception)
        self.assertIn("ended with exit status 2: error: unexpected argument '--horizn'", said)
        self.assertIn("tip: a similar argument exists: '--horizon'", said)

    def test_extra_arguments_that_print_and_exit_are_refused_at_once(self):
        for args in (["--help"], ["-h"]):
            with self.assertRaises(FadError) as cm:
                AnomalyService(MODEL, fad_path=FAD, extra_args=args)
            self.assertIn("does not answer messages", str(cm.exception))

    def test_json_replies_pass_the_start_check(self):
        with AnomalyService(MODEL, fad_path=FAD, extra_args=["--format", "json"]) as svc:
            self.assertTrue(svc.process_message("0,140,10,g,s").startswith('{"ready":false'))

    def test_a_missing_binary_is_a_clear_error(self):
        with self.assertRaises(FadError) as cm:
            AnomalyService(MODEL, fad_path="/nonexistent/fad")
        self.assertIn("cannot start /nonexistent/fad", str(cm.exception))

    def test_fad_bin_is_found_through_the_environment(self):
        old = os.environ.get("FAD_BIN")
        os.environ["FAD_BIN"] = FAD
        try:
            with AnomalyService(MODEL) as svc:
                self.assertEqual(svc.process_message("0,140,10,g,s"), "ready:false,detection:,needed:23")
        finally:
            if old is None:
                del os.environ["FAD_BIN"]
            else:
                os.environ["FAD_BIN"] = old


if __name__ == "__main__":
    unittest.main(verbosity=2)
