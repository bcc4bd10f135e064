# frozen_string_literal: true

require "spec_helper"
require "open3"
require "rbconfig"

# The gem's main job: examples/pipeline.rb (what script/demo runs) must finish by itself,
# exit 0, and print what came back through the processor and what the control plane knows.
RSpec.describe "examples/pipeline.rb" do
  root = File.expand_path("..", __dir__)

  it "runs the control plane, a processor and a consumer app end to end" do
    out, err, status = Open3.capture3(RbConfig.ruby, "-I#{root}/lib", "#{root}/examples/pipeline.rb", chdir: root)
    expect(status.success?).to be(true), "exit #{status.exitstatus}\n#{out}\n#{err}"

    # every event came back enriched, in order
    replies = out.lines.grep(/\A<- /)
    expect(replies.size).to eq(5)
    expect(replies.map { |l| l[/evt-\d/] }).to eq(%w[evt-0 evt-1 evt-2 evt-3 evt-4])
    expect(replies[1]).to include('"amount":1200.0', '"fee":3.6', '"class":"large"', '"seq":1')
    expect(out).to match(/payment-enricher #{Regexp.escape(Flowctl::VERSION)}: adds fees/)

    # errors, unknown components and missing tokens behave as documented
    expect(out).to include("bad event rejected as expected: Flowctl::InvalidArgument")
    expect(out).to include('heartbeat for an unknown source: success=false (unknown source "never-registered"')
    expect(out).to include("call without the token refused: Flowctl::Unauthenticated")

    # what the control plane knows: both components, their endpoints, status and metrics
    table = out[/== control plane: 2 component\(s\)\n(.*?)\n\n/m, 1]
    expect(table).not_to be_nil, out
    rows = table.lines.map(&:split)
    expect(rows[0]).to eq(%w[KIND PROTOCOL ID ENDPOINT STATUS LAST_HEARTBEAT METRICS])
    processor = rows.find { |r| r[0] == "processor" }
    consumer = rows.find { |r| r[0] == "consumer" }
    expect(processor[1]).to eq("seed")
    expect(processor[2]).to match(/\Aprocessor-\h{8}\z/)
    expect(processor[3]).to match(/\A127\.0\.0\.1:\d+\z/)
    expect(processor[4]).to eq("HEALTHY")
    expect(processor.last(2)).to eq(%w[processed=5 rejected=1])
    expect(consumer.values_at(1, 2, 4)).to eq(%w[seed payments-dashboard HEALTHY])
    expect(consumer.last).to eq("received=5")
    expect(out).to include("== pipeline OK: 5 events processed")
    expect(err).to eq("")
  end
end
