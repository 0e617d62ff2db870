//! Fixed key pairs for the security tests, generated once with `openssl genpkey` for these tests
//! only. Why fixed: generating RSA keys in a debug-build test is slow, and fixed keys keep the
//! tests deterministic. Never use them for anything else.

/// Ed25519 private key (PKCS#8).
pub(super) const ED25519_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIAyxYI03PLNCkULl23bJZlzdlMEdtzoQO5ranoUPlhd/
-----END PRIVATE KEY-----
";

/// The public half of [`ED25519_PRIVATE`] (SPKI).
pub(super) const ED25519_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA77geftc115oy1/7q+ochya52S2CrWga0f5wXxucnuIU=
-----END PUBLIC KEY-----
";

/// A second, unrelated Ed25519 private key.
pub(super) const ED25519_OTHER_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIFtIFknP1I4INa9vS6tTI5DCTIHVoEQ5fEH2w7UkJ2Tp
-----END PRIVATE KEY-----
";

/// The public half of [`ED25519_OTHER_PRIVATE`].
pub(super) const ED25519_OTHER_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAtoR9Fixym7/o2GnzMUxPlTeKbwDOkvOJuEeDZBHoyp0=
-----END PUBLIC KEY-----
";

/// P-256 private key (PKCS#8), for ES256.
pub(super) const P256_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgwOE81lZftLoYVFgH
qZw36GzD/QmUqpLWP+EOas2Dpa+hRANCAAS6so/DOgxQug0LP+JvUa82fUTr+MA0
lafP9pVKhg1DGMJ7ExoYT0vyKxUKohJUL/NlcnZC4u1mPVq44xTa9VKN
-----END PRIVATE KEY-----
";

/// The public half of [`P256_PRIVATE`].
pub(super) const P256_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEurKPwzoMULoNCz/ib1GvNn1E6/jA
NJWnz/aVSoYNQxjCexMaGE9L8isVCqISVC/zZXJ2QuLtZj1auOMU2vVSjQ==
-----END PUBLIC KEY-----
";

/// RSA-2048 private key (PKCS#8), for RS256.
pub(super) const RSA_PRIVATE: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCLp6KMuQWkNpbK
r/0RdlDqpKVBLfsn2rFTUKeRfmmLV2AMRGqt19TwaHNarcPckJiQ34E7J+78ceRK
C79913orGcxsSMmc8y4GM4IjVyvpeCI5kCi0MdicSoI4HbDjstKa6eHGJ/7te0t+
AIYGEZSfswIBvVs+2+iuSl1RdogWk2qP11m72secFUtTOVEMqVjMxGzsb4+8q4/G
xY8dsSO6KfN2GhagzOOvdlexbmHFadDSkH3uB/XQLixs0AqH7yqvpED5GwT0JkEW
zB6j5O7kwTzLhwmjPe7sjnv0BUETlH4xPtZ7Lr0MvTMJnLTvy2bt1nRxdPIybQsa
4Sq8wII9AgMBAAECggEAAgA94PxJq2eo03CgFJ74W9ROFdf90D1e6w2tyPThuEBh
POvCB4mfIG6usG7q7n8X4IODS4Cv+Of82F7AuKHcuz9cYXTNhrUpRKd6Rt1Z4Ld6
7g41txc7vkmHAhzSywBl6hhNxtQN4AMzOrPxN6cK1RrwfWvkIctu0wh3u9IR8xjW
M7AK2pkgn26231rpRFIwOngNZpzfJkQKnbPQEU3t9uAOA24/Ti/LZIrRwGl4cgl+
ZPLCEE3vEbqt+A/bgD4vChsESQwY/1he2TCKFm9sUG7nhwIqFXl0wZnZBAgCFWiI
uwD9z68UmzN8o4Y0vlADqHeQo67O+V/N1h8j3j/LwQKBgQDAvTJZJZjIi5r2+KXR
d9QsrlJOi07b12wDaeBloL9OT9Q6fEscX/3LxbeWopMZR3H//At1qeJ3UBVUvqvv
NQjV2D7esx/SwjFUb+Pl2ZktJ7BiCrM9aheWnPs1fipECf5ftAPy48OtOG+0Bw76
CqK3YMel85RocuaR3IKoEbxsDQKBgQC5fg//mCvaYRWlTl3kqflISxSkVQ7GH8/N
UZm0xTFIhMZZbD4Clh1z+GjLoKc/5vKEp1Ajgx/wjUB0yS3EmZjTzu3dfCFaJq23
EE8zWDJ4cKtyXAnA3wjWhe/NLD0ao//co3lfLnwoj9janFwJ0QzirJ9FkEs66Hr3
OBrmngVy8QKBgQC/kk4c9ZWqn7hjijmmvigSUSJWF3lGYhRmQDJeUSxVNluH1ksB
5RdqFxenjegP1EenXGo3hagnV14cYXibxmcFxm6XBAu5fHNzrdMjfukVTMGwcVo+
zNitR1MZlFGGVziS/2Z9YY34+oNsuSdVuISLKJLIjBcSykIK8NadHyPdcQKBgHee
cwS6BjWq/AGBWw12C3ryaBpde8yKgUB/yeaIb/K7JQpPwmF6mv3JiRMfxBtyfJzN
JOHx0mwXOyTVA73P631T6ZM2VG/Fl6sBSoHq84k152o1LlkBu7pT30PprnH6pqqL
hV67JHgn44l+4d+2v1+CQKfkmI8hkwLQXJCyAQORAoGBAKDL5JNDc8PZMXkctX/c
+QKhLBFF89vCKLFncQZA31Rx13k/RrhtuBUsa4H+wEqqtJaEoJdyVbjtJSXlvRYO
KBz5APXvJqUKYbDeWcm207fgZy6ByMxENLzWJjbwDYzRNjDmNOmEh61PUbHqP1HJ
Qu7QEq6u+FqIRheaHkyKbbQp
-----END PRIVATE KEY-----
";

/// The public half of [`RSA_PRIVATE`].
pub(super) const RSA_PUBLIC: &str = "\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAi6eijLkFpDaWyq/9EXZQ
6qSlQS37J9qxU1CnkX5pi1dgDERqrdfU8GhzWq3D3JCYkN+BOyfu/HHkSgu/fdd6
KxnMbEjJnPMuBjOCI1cr6XgiOZAotDHYnEqCOB2w47LSmunhxif+7XtLfgCGBhGU
n7MCAb1bPtvorkpdUXaIFpNqj9dZu9rHnBVLUzlRDKlYzMRs7G+PvKuPxsWPHbEj
uinzdhoWoMzjr3ZXsW5hxWnQ0pB97gf10C4sbNAKh+8qr6RA+RsE9CZBFsweo+Tu
5ME8y4cJoz3u7I579AVBE5R+MT7Wey69DL0zCZy078tm7dZ0cXTyMm0LGuEqvMCC
PQIDAQAB
-----END PUBLIC KEY-----
";
