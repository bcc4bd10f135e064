# frozen_string_literal: true

require "spec_helper"
require "open3"
require "rbconfig"
require "tmpdir"

# script/demo: flowctl-pipeline runs examples/pipeline.yaml on the embedded control plane.
RSpec.describe "script/demo (flowctl-pipeline run examples/pipeline.yaml)" do
  root = File.expand_path("..", __dir__)

  it "runs the example pipeline to completion: every number squared reaches the consumer" do
    skip "examples/pipeline.yaml and Flowctl::Component are not here yet" unless
      File.exist?(File.join(root, "examples/pipeline.yaml")) && defined?(Flowctl::Component::Source)

    Dir.mktmpdir do |logs|
      out, err, st = Open3.capture3(RbConfig.ruby, "-I#{root}/lib", "#{root}/exe/flowctl-pipeline", "run",
                                    "examples/pipeline.yaml", "--no-db", "--param", "start_ledger=1",
                                    "--param", "end_ledger=10", "--log-dir", logs, chdir: root)
      expect(st.exitstatus).to eq(0), "#{out}\n#{err}"
      last = JSON.parse(out.lines.last)
      expect(last["state"]).to eq("COMPLETED")
      expect(last["components"].transform_values { |c| c.values_at("in", "out") }).to eq(
        "numbers" => [0, 10], "square" => [10, 10], "printer" => [10, 0]
      )
      expect(err).to match(/run run-\S+: squares \(3 components\), control plane 127\.0\.0\.1:\d+/)
      expect(err).to match(/: COMPLETED$/)
      printed = File.read(File.join(logs, "printer.log")).lines.grep(/\Asquared /)
      expect(printed.map { |l| l.chomp[/\d+\z/].to_i }.sort).to eq((1..10).map { |n| n * n })
    end
  end
end
