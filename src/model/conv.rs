//! Convolutions on channels-last maps (batch, height, width, channels): a k x k
//! convolution is one GEMM of each output pixel's gathered neighbourhood
//! (im2col, whole channel vectors copied at a time) by the weight laid out
//! once at load. candle's own conv2d re-lays the weight and the input out on
//! every call and gathers element by element.

use anyhow::{Result, bail};
use candle_core::Tensor;

/// A k x k convolution (k odd) with a bias, zero padding k/2 and a stride.
#[derive(Debug, Clone)]
pub struct ChannelsLastConv {
    /// (k·k·inputs, outputs): row (ky·k + kx)·inputs + i.
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
}

impl ChannelsLastConv {
    /// From PyTorch's layout: `weight` (outputs, inputs, k, k), `bias` (outputs).
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize) -> Result<Self> {
        let (outputs, inputs, kernel, kernel_w) = weight.dims4()?;
        if kernel != kernel_w || kernel % 2 == 0 || stride == 0 {
            bail!("a convolution needs a square odd kernel and a stride, got {:?} and {stride}", weight.dims());
        }
        if bias.dims() != [outputs] {
            bail!("a bias of shape {:?} for {outputs} outputs", bias.dims());
        }
        let weight = weight.permute((2, 3, 1, 0))?.reshape((kernel * kernel * inputs, outputs))?.contiguous()?;
        Ok(Self { weight, bias: bias.clone(), kernel, stride })
    }

    pub fn inputs(&self) -> usize {
        self.weight.dims()[0] / (self.kernel * self.kernel)
    }

    pub fn outputs(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// (B, H, W, inputs) -> (B, ⌈H/stride⌉, ⌈W/stride⌉, outputs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, height, width, channels) = x.dims4()?;
        if channels != self.inputs() {
            bail!("a convolution of {} input channels given {channels}", self.inputs());
        }
        let (k, s) = (self.kernel, self.stride);
        let (out_h, out_w) = (height.div_ceil(s), width.div_ceil(s));
        let columns = if k == 1 && s == 1 {
            x.reshape((batch * height * width, channels))?
        } else {
            let values = x.flatten_all()?.to_vec1::<f32>()?;
            let mut gathered = vec![0f32; batch * out_h * out_w * k * k * channels];
            for (image, columns) in values
                .chunks_exact(height * width * channels)
                .zip(gathered.chunks_exact_mut(out_h * out_w * k * k * channels))
            {
                im2col(image, (height, width, channels), k, s, columns);
            }
            Tensor::from_vec(gathered, (batch * out_h * out_w, k * k * channels), x.device())?
        };
        let y = columns.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((batch, out_h, out_w, self.outputs()))?)
    }
}

/// Each output pixel's k x k neighbourhood of one channels-last image into
/// `out` (zeroed), (out_h·out_w, k·k·channels) in output order; zero outside
/// the image.
fn im2col(values: &[f32], (height, width, channels): (usize, usize, usize), k: usize, stride: usize, out: &mut [f32]) {
    let radius = k / 2;
    let out_w = width.div_ceil(stride);
    let row_len = k * k * channels;
    for (pixel, row) in out.chunks_exact_mut(row_len).enumerate() {
        let (oy, ox) = (pixel / out_w * stride, pixel % out_w * stride);
        for ky in 0..k {
            let Some(y) = (oy + ky).checked_sub(radius).filter(|&y| y < height) else { continue };
            for kx in 0..k {
                let Some(x) = (ox + kx).checked_sub(radius).filter(|&x| x < width) else { continue };
                let source = (y * width + x) * channels;
                row[(ky * k + kx) * channels..][..channels].copy_from_slice(&values[source..source + channels]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// candle's conv2d, the reference, against the channels-last GEMM.
    #[test]
    fn matches_candle_conv2d() {
        let device = Device::Cpu;
        let wave = |n: usize, phase: f32| (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect::<Vec<f32>>();
        for (k, stride, (h, w), inputs, outputs) in [
            (3, 1, (5, 7), 4, 3),
            (3, 2, (6, 9), 3, 5),
            (3, 2, (7, 4), 2, 2),
            (1, 1, (3, 4), 6, 2),
            (3, 1, (1, 1), 2, 1),
        ] {
            let x = Tensor::from_vec(wave(2 * inputs * h * w, 0.1), (2, inputs, h, w), &device).unwrap();
            let weight =
                Tensor::from_vec(wave(outputs * inputs * k * k, 0.7), (outputs, inputs, k, k), &device).unwrap();
            let bias = Tensor::from_vec(wave(outputs, 1.3), outputs, &device).unwrap();
            let expected = x
                .conv2d(&weight, k / 2, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((outputs, 1, 1)).unwrap())
                .unwrap();
            let conv = ChannelsLastConv::new(&weight, &bias, stride).unwrap();
            let got = conv.forward(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()).unwrap();
            let got = got.permute((0, 3, 1, 2)).unwrap();
            assert_eq!(got.dims(), expected.dims(), "k {k} stride {stride} {h}x{w}");
            let err = (got - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "k {k} stride {stride} {h}x{w}: {err}");
        }
    }
}
