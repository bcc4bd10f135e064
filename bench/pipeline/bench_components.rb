# frozen_string_literal: true

# The three Flowctl::Component classes both pipeline benchmarks run: bench/pipeline.rb
# (flowctl_components.rb, wired by hand) and bench/pipeline_runner.rb (components.rb,
# started by flowctl-pipeline's Supervisor).
$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "flowctl"

PAYLOAD = ("x" * 1024).b.freeze

class BenchSource < Flowctl::Component::Source
  info name: "bench-source", version: "1.0.0", output_event_types: ["raw"]
  def each_event(request)
    Integer(request.params["count"]).times { |i| yield Flowctl::V1::Event.new(id: i.to_s, type: "raw", payload: PAYLOAD) }
  end
end

class BenchProcessor < Flowctl::Component::Processor
  info name: "bench-processor", version: "1.0.0", input_event_types: ["raw"], output_event_types: ["processed"]
  def process(e) = Flowctl::V1::Event.new(id: e.id, type: "processed", payload: e.payload)
end

class BenchConsumer < Flowctl::Component::Consumer
  info name: "bench-consumer", version: "1.0.0", input_event_types: ["processed"]
  def consume(_event) = nil
end
