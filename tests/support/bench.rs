//! What the benchmark binaries share: percentiles, milliseconds, rounding for their JSON, and
//! scratch directories.

use std::{path::Path, time::Duration};

use anyhow::Context as _;

/// A percentile, held as the fraction of the samples at or below it (`P95` is 0.95). Made only
/// from the constants or from a whole percent, so a percent can never be read as a fraction or
/// the other way round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentile(f64);

impl Percentile {
    /// The median, as a nearest-rank percentile (a sample; see [`median`] for the midpoint).
    pub const P50: Self = Self(0.5);
    pub const P95: Self = Self(0.95);
    /// The largest sample.
    pub const MAX: Self = Self(1.0);

    /// The `percent`th percentile; `percent` is at most 100.
    pub fn new(percent: u8) -> Self {
        assert!(percent <= 100, "a percentile of {percent} %: at most 100");
        Self(f64::from(percent) / 100.0)
    }

    /// The fraction of the samples at or below it, 0..=1.
    pub fn fraction(self) -> f64 {
        self.0
    }
}

/// The nearest-rank percentile of `samples`, in any order: the smallest sample with at least
/// that fraction of them at or below it. Panics on no samples.
pub fn percentile(samples: &[f64], p: Percentile) -> f64 {
    assert!(!samples.is_empty(), "a percentile of no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let len = sorted.len();
    // A rank between 1 and len, from a len far below 2^52: the casts are exact.
    let rank = ((p.fraction() * len as f64).ceil() as usize).clamp(1, len);
    sorted[rank - 1]
}

/// The midpoint of `samples`, in any order: the middle one, or the mean of the two middle ones
/// of an even count. Panics on no samples.
pub fn median(samples: &[f64]) -> f64 {
    assert!(!samples.is_empty(), "a median of no samples");
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Each duration in milliseconds, for [`percentile`].
pub fn ms_each(samples: &[Duration]) -> Vec<f64> {
    samples.iter().copied().map(ms).collect()
}

/// `x` rounded to `decimals` places, for figures in JSON output.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// A directory of a benchmark's own under the temp dir, removed on drop (with a warning if
/// that fails).
pub struct ScratchDir(Option<tempfile::TempDir>);

impl ScratchDir {
    /// Creates `<temp dir>/micropod-<tag>-<random>`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("micropod-{tag}-"))
            .tempdir()
            .with_context(|| {
                format!(
                    "creating a scratch directory in {}",
                    std::env::temp_dir().display()
                )
            })?;
        Ok(Self(Some(dir)))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until drop").path()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("warning: cannot remove {}: {e}", path.display());
            }
        }
    }
}
