//! `eastwest-bench run`.

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("eastwest-bench run: not implemented yet")
}
