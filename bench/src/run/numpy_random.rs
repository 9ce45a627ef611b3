//! numpy's legacy global generator (`np.random.seed` + `RandomState`: MT19937 with the
//! legacy `randint`, `random_sample` and `exponential`), bit for bit, so that one `--seed`
//! gives `run` the same prompt lengths and arrival intervals as sglang's bench_serving,
//! which draws them with `np.random.randint` and `np.random.exponential`.
//!
//! Ported from numpy's C sources (`mt19937.c`, `distributions.c`/`legacy-distributions.c`,
//! `random_bounded_uint64_fill`); checked against numbers numpy itself drew
//! (`bench/tests/fixtures/numpy_streams.json`, made by the script next to it).

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// `np.random.RandomState` after `np.random.seed(seed)`.
#[derive(Clone)]
pub struct RandomState {
    key: [u32; N],
    pos: usize,
}

impl std::fmt::Debug for RandomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RandomState")
            .field("pos", &self.pos)
            .finish()
    }
}

impl RandomState {
    /// `np.random.seed(seed)` for an integer seed (numpy accepts 0..=2**32-1).
    pub fn seed(seed: u32) -> RandomState {
        let mut key = [0u32; N];
        let mut s = seed;
        for (pos, k) in key.iter_mut().enumerate() {
            *k = s;
            s = 1_812_433_253u32
                .wrapping_mul(s ^ (s >> 30))
                .wrapping_add(pos as u32 + 1);
        }
        RandomState { key, pos: N }
    }

    fn generate(&mut self) {
        let k = &mut self.key;
        let mix = |a: u32, b: u32, c: u32| {
            let y = (a & UPPER_MASK) | (b & LOWER_MASK);
            c ^ (y >> 1) ^ if y & 1 == 1 { MATRIX_A } else { 0 }
        };
        for i in 0..N - M {
            k[i] = mix(k[i], k[i + 1], k[i + M]);
        }
        for i in N - M..N - 1 {
            k[i] = mix(k[i], k[i + 1], k[i + M - N]);
        }
        k[N - 1] = mix(k[N - 1], k[0], k[M - 1]);
        self.pos = 0;
    }

    /// One tempered 32-bit output (`mt19937_next32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos == N {
            self.generate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn next_u64(&mut self) -> u64 {
        (u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())
    }

    /// `random_sample()`: a double in [0, 1) from 53 random bits.
    pub fn random_sample(&mut self) -> f64 {
        let a = f64::from(self.next_u32() >> 5);
        let b = f64::from(self.next_u32() >> 6);
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }

    /// `randint(low, high)`: uniform in `[low, high)` by masked rejection sampling, as the
    /// legacy generator does (no draw at all when the range holds one value).
    pub fn randint(&mut self, low: i64, high: i64) -> anyhow::Result<i64> {
        anyhow::ensure!(low < high, "randint: low ({low}) >= high ({high})");
        let rng = high.wrapping_sub(low).wrapping_sub(1) as u64;
        let offset = if rng == 0 {
            0
        } else if rng <= u64::from(u32::MAX) {
            if rng == u64::from(u32::MAX) {
                u64::from(self.next_u32())
            } else {
                let mask = mask_for(rng) as u32;
                loop {
                    let v = self.next_u32() & mask;
                    if u64::from(v) <= rng {
                        break u64::from(v);
                    }
                }
            }
        } else if rng == u64::MAX {
            self.next_u64()
        } else {
            let mask = mask_for(rng);
            loop {
                let v = self.next_u64() & mask;
                if v <= rng {
                    break v;
                }
            }
        };
        Ok(low.wrapping_add(offset as i64))
    }

    /// `exponential(scale)` (legacy: `-log(1 - random_sample())` scaled).
    pub fn exponential(&mut self, scale: f64) -> f64 {
        scale * -(1.0 - self.random_sample()).ln()
    }
}

/// The smallest `2**k - 1` that is >= `rng`.
fn mask_for(rng: u64) -> u64 {
    if rng == 0 {
        0
    } else {
        u64::MAX >> rng.leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/numpy_streams.json"))
            .expect("fixture is JSON")
    }

    fn ints(v: &serde_json::Value) -> Vec<i64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_i64().expect("integer"))
            .collect()
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    fn assert_close(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs(),
                "{what}[{i}]: got {g:e}, numpy drew {w:e}"
            );
        }
    }

    #[test]
    fn primitives_match_numpy() {
        for case in fixture()["primitives"].as_array().expect("primitives") {
            let seed = case["seed"].as_u64().expect("seed") as u32;
            let mut rs = RandomState::seed(seed);
            let uniform: Vec<f64> = (0..5).map(|_| rs.random_sample()).collect();
            assert_close(&uniform, &floats(&case["random_sample"]), "random_sample");
            let small: Vec<i64> = (0..5).map(|_| rs.randint(3, 10).unwrap()).collect();
            assert_eq!(small, ints(&case["randint_3_10"]), "seed {seed}");
            let full: Vec<i64> = (0..3).map(|_| rs.randint(0, 1 << 32).unwrap()).collect();
            assert_eq!(full, ints(&case["randint_0_2p32"]), "seed {seed}");
            let wide: Vec<i64> = (0..5)
                .map(|_| rs.randint(-(1 << 40), 1 << 40).unwrap())
                .collect();
            assert_eq!(wide, ints(&case["randint_m2p40_2p40"]), "seed {seed}");
            let exp: Vec<f64> = (0..3).map(|_| rs.exponential(2.5)).collect();
            assert_close(&exp, &floats(&case["exponential_2_5"]), "exponential");
        }
    }

    #[test]
    fn mask_is_the_next_power_of_two_minus_one() {
        assert_eq!(mask_for(0), 0);
        assert_eq!(mask_for(1), 1);
        assert_eq!(mask_for(6), 7);
        assert_eq!(mask_for(8), 15);
        assert_eq!(mask_for(u64::MAX), u64::MAX);
    }
}
