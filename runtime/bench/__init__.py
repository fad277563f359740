"""The workloads behind ``shmflow bench`` (not collected by pytest)."""
