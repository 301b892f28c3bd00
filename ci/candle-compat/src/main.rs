//! Uses the crate as candle model code would; `cargo check` is the test (no GPU, no link).
fn main() {
    let attn = attention::select().expect("select");
    println!("{}", attn.device_summary());
}
