# frozen_string_literal: true

module Flowctl
  module Component
    # A processor maps each Event to zero, one or many Events:
    #
    #   class Square < Flowctl::Component::Processor
    #     info name: "square", version: "1.0.0", input_event_types: ["raw"], output_event_types: ["squared"]
    #     def process(event) = Flowctl::V1::Event.new(id: event.id, type: "squared", payload: (event.payload.to_i**2).to_s)
    #   end
    #   Square.run
    #
    # #process returns nil (no output), an Event, a Hash of its fields, or an Array of them; or
    # it yields its outputs one by one. It serves ProcessorService.Process (a bidi stream: each
    # stream's events are processed in order, one at a time); with protocols: [:v1, :seed] also
    # the seed's ProcessorService (DataMessages; see SeedProcessor).
    #
    # An event whose #process raised is failed (counted, logged, handed to #dead_letter) and
    # then, by settings.failed_events: dropped (:drop, the default), or replied marked
    # (:reply, the default under flowctl-pipeline): a copy of the input with metadata
    # "flowctl.error" = "<Class>: <message>" and "flowctl.failed_at" = the component id,
    # which flowctl-pipeline counts as failed and routes to the pipeline's dead-letter sink.
    class Processor < Base
      EVENT = Flowctl::V1::Event
      FAILED_KEY = "flowctl.error"
      FAILED_AT_KEY = "flowctl.failed_at"

      def self.kind = :processor

      def process(_event)
        raise NotImplementedError, "#{self.class} must define process(event)"
      end

      # The flowctl.v1 ProcessorService handler.
      class Handler
        include Services::Common

        def process(requests, call)
          runtime = @runtime
          component = @component
          runtime.stream do |tally|
            while (event = runtime.read(requests))
              Processor.write(runtime, call, Processor.apply(runtime, component, event, tally))
            end
          end
          runtime.check_stopping
        end
      end

      # The outputs of one event (an Array of Events; when it failed, empty or the event
      # marked failed: see the class comment).
      # An Event (the usual case: one in, one out) or an Array of them.
      def self.apply(runtime, component, event, tally)
        result = runtime.run_event(event, tally) do
          yielded = nil
          returned = component.process(event) { |out| (yielded ||= []) << out }
          yielded.nil? && returned.instance_of?(EVENT) ? returned : Services.events(yielded || returned)
        end
        return result unless result.instance_of?(Runtime::Failure)

        runtime.settings.failed_events == :reply ? [mark_failed(event, result.error, runtime.settings.id)] : []
      end

      # A copy of event with the failure in its metadata.
      def self.mark_failed(event, error, id)
        copy = event.dup
        copy.metadata = event.metadata.merge(FAILED_KEY => "#{error.class}: #{error.message}", FAILED_AT_KEY => id)
        copy
      end

      # Sends outputs (an Event or an Array); those the peer can no longer take (it went
      # away) count as dropped.
      def self.write(runtime, call, outputs)
        return write_one(runtime, call, outputs) if outputs.instance_of?(EVENT)

        outputs.each_with_index do |out, i|
          call.write(out)
        rescue Flowctl::Error
          runtime.metrics.dropped(outputs.size - i)
          raise
        end
      end

      def self.write_one(runtime, call, event)
        call.write(event)
      rescue Flowctl::Error
        runtime.metrics.dropped
        raise
      end
    end
  end
end
