# frozen_string_literal: true

# Wires bench/pipeline.rb's official-gem components like `flowctl run` does: the source's
# StreamEvents feeds the processor's Process, whose output feeds the consumer's Consume.
# ruby official_runner.rb SOURCE_PORT PROCESSOR_PORT CONSUMER_PORT COUNT WARMUP -> prints JSON
$LOAD_PATH.unshift File.expand_path("../../spec/gen/official_v1", __dir__)
require "grpc"
require_relative "timing"
require "official_flowctl/v1/source_services_pb"
require "official_flowctl/v1/processor_services_pb"
require "official_flowctl/v1/consumer_services_pb"

V1 = OfficialFlowctl::V1
sp, pp, cp, count, warmup = ARGV
source = V1::SourceService::Stub.new("127.0.0.1:#{sp}", :this_channel_is_insecure)
processor = V1::ProcessorService::Stub.new("127.0.0.1:#{pp}", :this_channel_is_insecure)
consumer = V1::ConsumerService::Stub.new("127.0.0.1:#{cp}", :this_channel_is_insecure)
PipelineTiming.report(Integer(count), Integer(warmup)) do |n|
  events = source.stream_events(V1::StreamRequest.new(params: { "count" => n.to_s }))
  consumer.consume(processor.process(events)).events_consumed
end
