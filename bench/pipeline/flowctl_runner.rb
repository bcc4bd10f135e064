# frozen_string_literal: true

# Wires bench/pipeline.rb's Flowctl::Component components like `flowctl run` does, with the
# gem's flowctl.v1 clients. ruby flowctl_runner.rb SOURCE_PORT PROCESSOR_PORT CONSUMER_PORT COUNT
$LOAD_PATH.unshift File.expand_path("../../lib", __dir__)
require "flowctl"
require_relative "timing"

V1 = Flowctl::V1
sp, pp, cp, count = ARGV
# Flowctl::V1::SourceClient, ... (built from the service where the gem has none)
client = lambda do |kind, port|
  name = :"#{kind}Client"
  klass = V1.const_defined?(name, false) ? V1.const_get(name) : Class.new(Flowctl::Client) { use_service V1.const_get(:"#{kind}Service") }
  klass.new("127.0.0.1:#{port}", tls: false)
end
source = client.call("Source", sp)
processor = client.call("Processor", pp)
consumer = client.call("Consumer", cp)
PipelineTiming.report do
  events = source.stream_events(V1::StreamRequest.new(params: { "count" => count }))
  consumer.consume(processor.process(events)).events_consumed
end
