# frozen_string_literal: true

require "spec_helper"
require "flowctl/pipeline"
require "stringio"

# Live progress: JSON lines when not on a terminal, a table redrawn in place on one.
RSpec.describe Flowctl::Pipeline::Progress do
  def snap(out) = { "gen" => { "in" => 0, "out" => out, "in_flight" => 2, "failed" => 0, "dropped" => 0 },
                    "sink" => { "in" => out, "out" => 0, "in_flight" => 0, "failed" => 1, "dropped" => 0 } }

  it "writes one JSON object per update, with rates from the previous one" do
    io = StringIO.new
    p = described_class.new(io, "run-1", tty: false)
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    p.update(snap(100), { "gen" => 1 }, "RUNNING")
    sleep 0.2
    p.update(snap(300), { "gen" => 1 }, "COMPLETED")
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
    first, second = io.string.lines.map { |l| JSON.parse(l) }
    expect(first.values_at("run", "state")).to eq(%w[run-1 RUNNING])
    expect(first["components"]["gen"]).to include("out" => 100, "out_per_s" => 0.0, "in_flight" => 2, "restarts" => 1)
    expect(second["state"]).to eq("COMPLETED")
    expect(second["components"]["gen"]["out_per_s"]).to be_between(200 / elapsed, 200 / 0.19)
    expect(second["components"]["sink"]).to include("in" => 300, "failed" => 1, "restarts" => 0)
  end

  it "redraws a table in place on a terminal" do
    io = StringIO.new
    p = described_class.new(io, "run-1", tty: true)
    p.update(snap(100), {}, "RUNNING")
    p.update(snap(300), {}, "RUNNING")
    first, second = io.string.split(/(?=\e\[4A)/, 2)
    expect(first).to start_with("\e[2Krun-1  RUNNING")
    expect(first).to include("COMPONENT", "IN-FLIGHT")
    expect(first.lines.size).to eq(4)
    expect(second).to start_with("\e[4A") # back up over the 4 lines, then each is cleared and written again
    expect(second.scan("\e[2K").size).to eq(4)
    expect(second.lines.last).to match(/\A\e\[2Ksink\s+300\s+0 /)
  end
end
