"""Policy and accounting: what a guest's tree costs, and what it may still allocate.

- usage: the rule and the scan (`cowfs du`): every inode the guest alone holds,
  once; shared files reported, not charged.
- limits: a guest's disk limits and quotas (DiskPolicy) checked against its usage.
- accountant: the mount's bridge from FUSE operations to the policy: a context
  manager around each operation checks before, charges what the backing
  filesystem really did after.
- ledger: the mount's books in the state database: usage in and out, limits and
  quotas reloaded on SIGHUP.
"""
