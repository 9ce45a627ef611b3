//! `eastwest-bench wan`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("eastwest-bench wan: not implemented yet")
}
