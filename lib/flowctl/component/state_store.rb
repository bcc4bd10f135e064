# frozen_string_literal: true

module Flowctl
  module Component
    # Where a source keeps what SourceService.GetState/SaveState read and write: per key, a
    # Hash of String => String, its resume token (the "resume_token" entry) and when it was
    # last saved. In memory by default; a source that must survive restarts overrides
    # Source#state_store with any object that has #get(key) and #save(key, state).
    class StateStore
      def initialize
        @lock = Mutex.new
        @entries = {}
      end

      # {state: Hash, resume_token: String, last_updated_unix: Integer} ("" and 0 when never saved).
      def get(key)
        @lock.synchronize do
          e = @entries[key.to_s]
          e ? e.dup : { state: {}, resume_token: "", last_updated_unix: 0 }
        end
      end

      def save(key, state)
        raise TypeError, "state must be a Hash of String => String (given #{state.class})" unless state.is_a?(Hash)

        clean = state.to_h { |k, v| [k.to_s.dup.freeze, v.to_s.dup.freeze] }.freeze
        @lock.synchronize do
          @entries[key.to_s.dup.freeze] = { state: clean, resume_token: clean.fetch("resume_token", ""),
                                            last_updated_unix: Time.now.to_i }.freeze
        end
        nil
      end
    end
  end
end
