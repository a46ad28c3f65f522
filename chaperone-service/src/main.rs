//! Binary entry point of `chaperone-service`.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("chaperone-service is not available yet")
}
