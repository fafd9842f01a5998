//! A loss-curve PNG drawn without a plotting library: training loss per step (blue) and
//! validation loss (red dots), on a linear scale from 0 to the largest loss.

use std::path::Path;

use crate::run_dir::METRICS_FILE;

/// File name of the plot in the run directory.
pub const PLOT_FILE: &str = "loss.png";

const WIDTH: usize = 640;
const HEIGHT: usize = 400;
const MARGIN: usize = 30;

/// Reads `metrics.jsonl` and writes `loss.png` beside it.
pub fn write_loss_plot(run_dir: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(run_dir.join(METRICS_FILE))?;
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let step = value["step"].as_f64().unwrap_or(0.0);
        if let Some(loss) = value["loss"].as_f64() {
            train.push((step, loss));
        } else if let Some(loss) = value["validation"]["loss"].as_f64() {
            validation.push((step, loss));
        }
    }
    let png = render(&train, &validation);
    std::fs::write(run_dir.join(PLOT_FILE), png)
}

fn render(train: &[(f64, f64)], validation: &[(f64, f64)]) -> Vec<u8> {
    let mut pixels = vec![255u8; WIDTH * HEIGHT * 3];
    let max_step = train.iter().chain(validation).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = train.iter().chain(validation).map(|p| p.1).filter(|l| l.is_finite()).fold(1e-9, f64::max);
    let to_pixel = |(step, loss): (f64, f64)| {
        let x = MARGIN as f64 + step / max_step * (WIDTH - 2 * MARGIN) as f64;
        let y = (HEIGHT - MARGIN) as f64 - loss.clamp(0.0, max_loss) / max_loss * (HEIGHT - 2 * MARGIN) as f64;
        (x, y)
    };

    let mut put = |x: i64, y: i64, color: [u8; 3]| {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = (y as usize * WIDTH + x as usize) * 3;
            pixels[i..i + 3].copy_from_slice(&color);
        }
    };

    // Axes.
    for x in MARGIN..WIDTH - MARGIN {
        put(x as i64, (HEIGHT - MARGIN) as i64, [0, 0, 0]);
    }
    for y in MARGIN..HEIGHT - MARGIN {
        put(MARGIN as i64, y as i64, [0, 0, 0]);
    }

    // Training loss as line segments.
    for pair in train.windows(2) {
        let (x0, y0) = to_pixel(pair[0]);
        let (x1, y1) = to_pixel(pair[1]);
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            put((x0 + t * (x1 - x0)) as i64, (y0 + t * (y1 - y0)) as i64, [30, 90, 200]);
        }
    }

    // Validation loss as 5x5 dots.
    for &point in validation {
        let (x, y) = to_pixel(point);
        for dx in -2..=2 {
            for dy in -2..=2 {
                put(x as i64 + dx, y as i64 + dy, [210, 40, 40]);
            }
        }
    }

    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("in-memory PNG header");
        writer.write_image_data(&pixels).expect("in-memory PNG data");
    }
    out
}
