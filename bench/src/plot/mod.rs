//! The pictures, drawn with plotters into PNG files. Text uses DejaVu Sans
//! embedded from the `dejavu` crate through plotters' `ab_glyph` feature, so a
//! picture looks the same on every machine and nothing looks fonts up.
//!
//! [`sheet`] draws a scenario: one panel per variant (guard on above guard off),
//! same axes. [`soak`] draws a soak run and the trend of its idle readings.
//! [`flood`] draws a flood: what the flooder held and the good client's tries.
//! [`resize`] draws a run whose limit shrank under it.

pub mod flood;
mod legend;
pub mod resize;
pub mod sheet;
pub mod soak;

use std::sync::Once;

use plotters::style::{FontStyle, RGBColor, register_font};

/// The family name the pictures ask for.
pub const FONT: &str = "sans-serif";

// A colour-blind-safe palette (Tableau 10), one colour per meaning across pictures.
pub const RSS: RGBColor = RGBColor(31, 119, 180);
pub const WORKING_SET: RGBColor = RGBColor(44, 160, 44);
pub const RESERVED: RGBColor = RGBColor(148, 103, 189);
pub const LIMIT: RGBColor = RGBColor(214, 39, 40);
pub const BUDGET: RGBColor = RGBColor(255, 127, 14);
pub const PURGE: RGBColor = RGBColor(23, 190, 207);
pub const GREY: RGBColor = RGBColor(127, 127, 127);
pub const TREND: RGBColor = RGBColor(227, 119, 194);

/// Registers the embedded fonts with plotters, once per process.
pub fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ok = register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok();
        assert!(ok, "the embedded DejaVu fonts do not parse");
    });
}

/// Turns a plotters error (whose backend error is not always `Send`) into anyhow.
pub(crate) fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e:?}")
}

/// Times at which a cumulative counter went up between consecutive samples.
pub fn increments(points: impl IntoIterator<Item = (f64, Option<u64>)>) -> Vec<f64> {
    let mut last: Option<u64> = None;
    let mut marks = Vec::new();
    for (t, v) in points {
        let Some(v) = v else { continue };
        if last.is_some_and(|l| v > l) {
            marks.push(t);
        }
        last = Some(v);
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_where_a_counter_rises() {
        let points = [
            (0.0, Some(3)),
            (0.05, Some(3)),
            (0.1, None),
            (0.15, Some(5)),
            (0.2, Some(5)),
            (0.25, Some(6)),
        ];
        assert_eq!(increments(points), vec![0.15, 0.25]);
        assert!(
            increments([(0.0, Some(9))]).is_empty(),
            "a first reading is no event"
        );
    }
}
