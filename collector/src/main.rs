//! Binary entry point of `chaperone-collector`.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("chaperone-collector is not available yet")
}
