"""Process set-up before JAX starts: XLA flag merging and the XLA:CPU thread pool for fake devices."""

import os

from tweetjax.perf import env


def test_fake_device_count_reads_the_last_flag():
  assert env.fake_device_count("") == 1
  assert env.fake_device_count("--xla_foo=1 --xla_force_host_platform_device_count=3") == 3
  assert env.fake_device_count("--xla_force_host_platform_device_count=3 --xla_force_host_platform_device_count=8") == 8


def test_with_fake_devices_replaces_the_count_and_keeps_other_flags():
  flags = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"
  out = env.with_fake_devices({"XLA_FLAGS": flags, "HOME": "/h"}, 4)
  assert out["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false", "--xla_dump_to=/tmp/d",
                                      "--xla_force_host_platform_device_count=4"]
  assert out["HOME"] == "/h" and env.fake_device_count(env.with_fake_devices({}, 2)["XLA_FLAGS"]) == 2


def test_a_child_sizes_its_own_thread_pool_unless_the_user_set_one():
  parent = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  env.size_cpu_thread_pool(parent)  # what importing tweetjax did in the parent
  child = env.with_fake_devices(parent, 64)
  assert "PJRT_NPROC" not in child
  assert env.size_cpu_thread_pool(child) == max(os.cpu_count() or 1, 4 * 64)
  user = env.with_fake_devices({**parent, "PJRT_NPROC": "7"}, 64)
  assert user["PJRT_NPROC"] == "7"


def test_fake_devices_get_a_thread_pool_large_enough_for_their_collectives():
  # A pool of 12 threads deadlocked tiny's 8-device step within 300 steps on 2 cores (perf/env.py); 32 is the size.
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert env.size_cpu_thread_pool(environ) == max(os.cpu_count(), 32) and environ["PJRT_NPROC"] == str(
      max(os.cpu_count(), 32))
  assert env.size_cpu_thread_pool({"XLA_FLAGS": ""}) is None  # one device: XLA's default
  user = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "5"}
  assert env.size_cpu_thread_pool(user) is None and user["PJRT_NPROC"] == "5"  # the user's choice stands
  # This test process (tests/conftest.py imports tweetjax before JAX starts) runs with the enlarged pool.
  assert int(os.environ["PJRT_NPROC"]) >= 32


def test_merge_keeps_the_users_flags():
  merged = env.merge_xla_flags("--xla_a=1", ["--xla_a=2", "--xla_b=3", "--xla_b=4"])
  assert merged == "--xla_a=1 --xla_b=4"
