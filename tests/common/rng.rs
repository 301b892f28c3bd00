//! A tiny, dependency-free pseudo-random generator for tests (SplitMix64).
//!
//! Statistical quality is ample for generating attention inputs; what matters is that a failing
//! run can be replayed from the printed seed, so every constructor records its seed.

/// SplitMix64 generator. Not cryptographic; deterministic for a given seed.
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    /// A generator seeded from the clock and the process id, so each run sees new inputs.
    /// Prints nothing: tests print [`Rng::seed`] only when they fail.
    pub fn fresh() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // Mix in the pid and a per-process counter so generators made in the same nanosecond
        // (parallel test threads) still differ.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id() as u64;
        let seed = mix(nanos ^ pid.rotate_left(32) ^ mix(n.wrapping_add(0x1234_5678)));
        Self::seed(seed)
    }

    /// A generator with a fixed seed (to replay a failure).
    pub fn seed(seed: u64) -> Self {
        Rng { seed, state: seed }
    }

    /// The seed this generator started from.
    pub fn get_seed(&self) -> u64 {
        self.seed
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform integer in `0..n` (`n > 0`; slight modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn f32_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[-1, 1)`.
    pub fn f32_uniform(&mut self) -> f32 {
        self.f32_unit() * 2.0 - 1.0
    }

    /// Standard normal (Box–Muller; one value per call, the twin is discarded for simplicity).
    pub fn f32_normal(&mut self) -> f32 {
        // 1 - u is in (0, 1], so the log is finite.
        let u1 = 1.0 - ((self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64));
        let u2 = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Fill `buf` with standard-normal values converted by `f` (e.g. `half::f16::from_f32`).
    pub fn fill<T>(&mut self, buf: &mut [T], f: impl Fn(f32) -> T) {
        for x in buf {
            *x = f(self.f32_normal());
        }
    }
}

/// The SplitMix64 output function (a strong 64-bit mixer).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
