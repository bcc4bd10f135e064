# frozen_string_literal: true

module Flowctl
  module Component
    # A Processor on the seed's protocol (obsrvr.flow.processor.ProcessorService), for
    # protocols: [:seed] or [:v1, :seed]: GetCapabilities from the component's info, and
    # Process of DataMessages. A DataMessage becomes an Event with the payload, the metadata,
    # id = metadata["id"] and type = metadata["type"] (else the first input event type); each
    # output Event goes back as a DataMessage with its payload and its metadata plus "id" and
    # "type".
    class SeedProcessor
      def initialize(runtime)
        @runtime = runtime
        @component = runtime.component
        @default_type = runtime.component.class.component_info[:input_event_types].first || ""
      end

      def get_capabilities(_request)
        i = @runtime.info
        Flowctl::Processor::CapabilitiesResponse.new(
          processor_id: i[:id], name: i[:name], description: i[:description], version: i[:version],
          input_event_types: i[:input_event_types], output_event_types: i[:output_event_types],
          max_concurrent: @runtime.settings.max_concurrent || 0
        )
      end

      def process(requests, call)
        @runtime.stream do |tally|
          while (msg = @runtime.read(requests))
            outputs = Processor.apply(@runtime, @component, to_event(msg), tally)
            outputs = [outputs] if outputs.instance_of?(Processor::EVENT)
            Processor.write(@runtime, call, outputs.map { |e| to_message(e) })
          end
        end
        @runtime.check_stopping
      end

      private

      def to_event(msg)
        md = msg.metadata
        Flowctl::V1::Event.new(id: md.fetch("id", ""), type: md.fetch("type", @default_type), payload: msg.payload,
                               metadata: md)
      end

      def to_message(event)
        Flowctl::Processor::DataMessage.new(payload: event.payload,
                                            metadata: event.metadata.merge("id" => event.id, "type" => event.type))
      end
    end
  end
end
